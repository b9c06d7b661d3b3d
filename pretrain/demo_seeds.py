"""``python -m pretrain.demo_seeds DEMO_OUT``: the demo's transfer comparison repeated over fine-tune seeds.

One fine-tune pair (pretrained vs random init, same schedule and seed) is one draw: at the demo's size a
200-iteration Mask R-CNN's box-AP margin moves by several points with the fine-tune's own seed alone (head
initialisation and data order; README, "How much of a margin is the fine-tune's chance"). This reruns the demo's
pairs (``pretrain.demo.transfer_runs``, the same commands) on the weights a finished ``python -m pretrain.demo``
left in ``DEMO_OUT``, once per seed (Detectron2 ``SEED S``, MMSegmentation ``randomness.seed=S``), and reports
each margin per seed with its mean and standard deviation. Outputs: ``DEMO_OUT/seed_spread/seed{S}/`` (the
runs and their logs), ``seed_spread.json`` and ``seed_spread.md`` (``seed_spread_itersN/`` with
``--transfer-iters N``). Pairs whose two ``metrics.json`` exist are not rerun, so an interrupted call continues
where it stopped; delete a seed's folder to run it again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pretrain.demo import ROOT, _fmt, _run_pair, pair_logs, transfer_metrics, transfer_runs, weight_paths

#: ``--pairs`` names -> the pair names of ``transfer_runs``.
PAIRS = {"det-full": "detectron2 full", "det-frozen": "detectron2 frozen",
         "seg-full": "mmseg full", "seg-frozen": "mmseg frozen"}


def _refuse(message: str) -> None:
    """Stop with ``message`` on stderr and exit code 2 (a bad argument or input)."""
    print(f"demo_seeds: {message}", file=sys.stderr)
    raise SystemExit(2)


def weights_of(demo_out: Path) -> dict[str, tuple[Path, Path]]:
    """The converted weights ``python -m pretrain.demo`` wrote to ``demo_out``, by init (exit 2 if one is missing)."""
    weights = weight_paths(demo_out)
    missing = [str(p) for pair in weights.values() for p in pair if not p.is_file()]
    if missing:
        _refuse(f"{', '.join(missing)} not found: run `python -m pretrain.demo --out {demo_out}` "
                "(--skip-transfer is enough) first")
    return weights


def seeded(pair: str, cmd: list[str], seed: int) -> list[str]:
    """``cmd`` of a ``transfer_runs`` pair with the fine-tune's seed set (a trailing config override)."""
    return [*cmd, "SEED", str(seed)] if pair.startswith("detectron2") else [*cmd, f"randomness.seed={seed}"]


def margins(per_seed: dict[int, dict[str, float | None]]) -> dict[str, dict]:
    """Pretrained minus random init per metric: ``{"det_full_AP_b": {"per_seed": {S: margin}, "mean": .., "sd": ..}}``.

    ``per_seed[S]`` is :func:`pretrain.demo.transfer_metrics` of seed ``S``; a metric missing at some seed is
    left out of that seed; ``sd`` is the sample standard deviation (None below two seeds).
    """
    out: dict[str, dict] = {}
    for seed, metrics in sorted(per_seed.items()):
        for key, value in metrics.items():
            if "_pretrained_" not in key or value is None:
                continue
            other = metrics.get(key.replace("_pretrained_", "_random_"))
            if other is None:
                continue
            name = key.replace("_pretrained_", "_")
            out.setdefault(name, {"per_seed": {}})["per_seed"][seed] = value - other
    for row in out.values():
        values = list(row["per_seed"].values())
        row["mean"] = statistics.fmean(values)
        row["sd"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def table(spread: dict[str, dict], seeds: list[int]) -> str:
    """``spread`` (:func:`margins`) as a Markdown table, one row per metric."""
    head = "| pretrained - random init | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (SD) |"
    rule = "|---" * (len(seeds) + 2) + "|"
    rows = [head, rule]
    for name, row in spread.items():
        cells = [f"{row['per_seed'][s]:+.1f}" if s in row["per_seed"] else "n/a" for s in seeds]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {row['mean']:+.1f} ({_fmt(row['sd'])}) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the pairs at every seed and write the spread; returns 0 when every run succeeded."""
    ap = argparse.ArgumentParser(prog="python -m pretrain.demo_seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", help="a python -m pretrain.demo output folder (its converted weights are used)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fine-tune seeds (default 0-4)")
    ap.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS),
                    help="which comparisons to repeat (default all four)")
    ap.add_argument("--data", default="data/toy_scenes", help="toy scenes folder (train/val split of the fine-tunes)")
    ap.add_argument("--transfer-iters", type=int, default=None,
                    help="shorten every fine-tune to this many iterations (a quick check, not a comparison)")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        _refuse(f"--seeds must be distinct non-negative integers, got {args.seeds}")

    demo_out = (ROOT / args.demo_out).resolve()
    data = (ROOT / args.data).resolve()
    if not (data / "meta.json").is_file():
        _refuse(f"{data} holds no toy scenes (meta.json missing): the demo writes them")
    weights = weights_of(demo_out)
    wanted = {PAIRS[p] for p in args.pairs}
    # quick checks (--transfer-iters) apart, so that their runs are never kept as a real comparison's
    root = demo_out / ("seed_spread" if args.transfer_iters is None else f"seed_spread_iters{args.transfer_iters}")
    per_seed: dict[int, dict[str, float | None]] = {}
    timings: dict[str, float] = {}
    for i, seed in enumerate(args.seeds, 1):
        out = root / f"seed{seed}"
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        runs = {pair: by_init for pair, by_init in
                transfer_runs(sys.executable, data, out, weights, args.transfer_iters).items() if pair in wanted}
        for pair, by_init in runs.items():
            if all(path.is_file() for _, path in by_init.values()):
                print(f"\n==> [seed {seed} ({i}/{len(args.seeds)}), {pair}] done earlier, kept", flush=True)
                continue
            for _, path in by_init.values():
                path.unlink(missing_ok=True)  # half a pair from an interrupted call is not this call's result
            _run_pair({init: seeded(pair, cmd, seed) for init, (cmd, _) in by_init.items()},
                      pair_logs(logs, pair, by_init), timings, f"seed {seed} ({i}/{len(args.seeds)}), {pair}")
        per_seed[seed] = transfer_metrics(runs, ran=True)
    spread = margins(per_seed)
    md = table(spread, args.seeds)
    (root / "seed_spread.json").write_text(json.dumps(
        {"demo_out": str(demo_out), "seeds": args.seeds, "transfer_iters": args.transfer_iters,
         "metrics": per_seed, "margins": spread, "seconds": timings}, indent=2))
    (root / "seed_spread.md").write_text(md + "\n")
    print("\n" + md + f"\n\nwritten: {root / 'seed_spread.json'}, {root / 'seed_spread.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
