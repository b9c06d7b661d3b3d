"""``python -m pretrain.eval.curves RUN_DIR``: the held-out mIoU and FG-ARI over epochs, as a PNG.

Reads the online evaluation's rows (``"kind": "eval"``) of ``RUN_DIR/metrics.jsonl`` (the last row of an
epoch wins, as after a resume) and draws one panel per figure against epochs completed (matplotlib, Agg:
no display needed). ``--random-init`` also scores the run's teacher as ``train.seed`` initialised it,
on the same split and settings (:func:`pretrain.eval.online.evaluate_random_init`), draws it as a
horizontal line and writes it to ``<png stem>_random_init.json``; ``--random-init-json`` reuses such a file.

    python -m pretrain.eval.curves runs/demo/pretrain_seed0 --random-init --out runs/demo/online_eval.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Panels: (row key, title); both in percent.
PANELS = (("miou", "held-out mIoU (Hungarian, SlotCon Sec. 4.4)"), ("ari_fg", "held-out FG-ARI"))


def eval_curve(run_dir: str | Path) -> dict[int, dict]:
    """The run's eval rows by epoch (epochs completed), the last row of an epoch winning."""
    from pretrain.engine.hooks import metrics_rows

    return {r["epoch"]: r for r in metrics_rows(Path(run_dir) / "metrics.jsonl", "eval")}


def plot_curves(rows: dict[int, dict], out: str | Path, random_init: dict | None = None, title: str = "") -> Path:
    """Write the PNG: one panel per :data:`PANELS` entry; a figure that is ``null`` at an epoch is left out
    there, a panel without any value says so; ``random_init`` values as dashed horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6), dpi=100)
    for ax, (key, label) in zip(axes, PANELS):
        pts = sorted((e, r[key]) for e, r in rows.items() if r.get(key) is not None)
        if pts:
            ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", label="pretrained teacher")
        base = (random_init or {}).get(key)
        if base is not None:
            ax.axhline(base, linestyle="--", color="grey", label=f"random init ({base:.1f})")
        if not pts and base is None:
            ax.text(0.5, 0.5, "not available on this split", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epochs completed")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("percent")
        ax.grid(alpha=0.3)
        if pts or base is not None:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Draw the curves of a run; returns 0, or 2 (one line on stderr) when the run has no eval rows."""
    p = argparse.ArgumentParser(prog="python -m pretrain.eval.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG (default RUN_DIR/eval/online_eval.png)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--random-init", action="store_true", help="score the run's random initialisation for the baseline")
    g.add_argument("--random-init-json", type=Path, default=None, help="baseline figures written by --random-init")
    p.add_argument("--device", default=None, help="cuda | cpu for --random-init (default: cuda if available)")
    a = p.parse_args(argv)
    rows = eval_curve(a.run_dir)
    if not rows:
        print(f"no online evaluation rows in {a.run_dir / 'metrics.jsonl'} (eval.every_epochs / eval.at_end)",
              file=sys.stderr)
        return 2
    out = a.out or a.run_dir / "eval" / "online_eval.png"
    baseline = None
    if a.random_init:
        import torch

        from .inference import default_device
        from .online import evaluate_random_init

        baseline = evaluate_random_init(a.run_dir, torch.device(a.device) if a.device else default_device())
        side = out.with_name(f"{out.stem}_random_init.json")
        side.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps(baseline, indent=2, allow_nan=False))
        print(f"wrote {side}", file=sys.stderr)
    elif a.random_init_json is not None:
        baseline = json.loads(a.random_init_json.read_text())
    plot_curves(rows, out, baseline, title=a.run_dir.resolve().name)  # the run's name: a full path crowds the figure
    last = rows[max(rows)]
    print(json.dumps({"epochs": sorted(rows), "last": {k: last.get(k) for k, _ in PANELS},
                      "random_init": None if baseline is None else {k: baseline.get(k) for k, _ in PANELS}}))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
