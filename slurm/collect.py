"""Results table of a run's transfer jobs next to SlotCon's published numbers (Tables 2 and 3).

Reads each transfer job's metrics JSON (Detectron2: ``{"bbox": {"AP": ..}, "segm": {"AP": ..}}``,
MMSegmentation: ``{"metrics": {"mIoU": ..}}``; a flat ``{"AP_b": .., "mIoU": ..}`` also works),
writes ``RUN_DIR/results.md`` and ``RUN_DIR/results.json`` and returns the Markdown.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from slurm import registry
from slurm.published import METRICS, SLOTCON, setting_of


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _percent(v: float | None) -> float | None:
    # mmseg reports mIoU in percent; some writers use fractions. Papers report percent.
    return None if v is None else (v * 100.0 if v <= 1.0 else v)


def metrics_of(task: str, record: dict) -> dict[str, float | None]:
    """The table's metrics found in one task's metrics JSON (missing ones are None)."""
    out: dict[str, float | None] = {}
    if task == "det":
        bbox, segm = record.get("bbox") or {}, record.get("segm") or {}
        out["AP_b"] = _num(bbox.get("AP")) if bbox else _num(record.get("AP_b"))
        out["AP_m"] = _num(segm.get("AP")) if segm else _num(record.get("AP_m"))
    elif task in ("voc", "cityscapes", "ade20k"):
        m = record.get("metrics") if isinstance(record.get("metrics"), dict) else record
        out[f"mIoU_{task}"] = _percent(_num(m.get("mIoU")))
    return out


def _published_protocol(task: str, config: str | None) -> bool:
    """Whether a transfer job ran its task's default config: the protocol the published numbers came from.

    A job without a recorded config ran the default. Another config (``--task-config``, e.g. a
    ``*_imagenetnorm.py`` variant) measures something else, so its difference to the paper would mislead.
    """
    from slurm.transfer import TASKS

    default = TASKS[task].config if task in TASKS else None
    if not config or default is None:
        return True
    # Compared by the repository-relative tail: jobs.json holds absolute paths of the checkout that
    # submitted, which need not be the one collecting.
    want = Path(default).parts
    return Path(config).parts[-len(want):] == want


def collect(run_dir: str | Path) -> tuple[str, dict]:
    """Build the table for ``run_dir``; returns (markdown, json-able dict) and writes both files.

    The difference row compares only metrics from jobs that ran the published protocol configs.
    """
    run_dir = Path(run_dir)
    jobs = registry.load(run_dir).get("jobs", [])
    pre = [j for j in jobs if j["kind"] == "pretrain"]
    setting = setting_of(pre[-1]["extra"].get("config", "")) if pre else None
    ours: dict[str, float | None] = {k: None for k in METRICS}
    sources: dict[str, str] = {}
    problems: list[str] = []
    other_protocol: dict[str, str] = {}
    for j in (j for j in jobs if j["kind"] == "transfer"):
        task = j["extra"].get("task", "")
        config = j["extra"].get("config")
        path = Path(j["extra"].get("metrics") or run_dir / "transfer" / task / "metrics.json")
        if not path.is_file():
            problems.append(f"{task} (job {j['job_id']}): no metrics yet at {path}")
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"{task}: {path} is not valid JSON ({e})")
            continue
        for k, v in metrics_of(task, rec).items():
            if v is not None:  # the newest job of a task wins (jobs.json is in submission order)
                ours[k] = v
                sources[k] = str(path)
                if _published_protocol(task, config):
                    other_protocol.pop(k, None)
                else:
                    other_protocol[k] = str(config)
    settings = [setting] if setting else list(SLOTCON)
    cols = list(METRICS)
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = [f"# Transfer results: {run_dir.name}", "",
             "| | " + " | ".join(METRICS[c][0] for c in cols) + " |",
             "|---|" + "---|" * len(cols),
             f"| this run | " + " | ".join(fmt(ours[c]) for c in cols) + " |"]
    for s in settings:
        lines.append(f"| SlotCon {s.replace('_', ' ')} (published) | "
                     + " | ".join(fmt(SLOTCON[s][c]) for c in cols) + " |")
    if setting:
        lines.append("| difference | " + " | ".join(
            "–" if ours[c] is None or c in other_protocol else f"{ours[c] - SLOTCON[setting][c]:+.1f}"
            for c in cols) + " |")
    lines += ["", "Published: Wen et al., SlotCon (NeurIPS 2022), Tables 2 and 3; Mask R-CNN R50-FPN 1x "
              "(COCO), FCN (Cityscapes, VOC aug, ADE20K)."]
    if other_protocol:
        lines += ["", "Not compared with the paper (not the published protocol config):"] + [
            f"- {METRICS[k][0]}: {cfg}" for k, cfg in other_protocol.items()]
    if problems:
        lines += ["", "Missing:"] + [f"- {p}" for p in problems]
    md = "\n".join(lines) + "\n"
    data = {"run_dir": str(run_dir.resolve()), "setting": setting, "this_run": ours, "sources": sources,
            "published": {s: SLOTCON[s] for s in settings}, "missing": problems,
            "not_published_protocol": other_protocol}
    (run_dir / "results.md").write_text(md)
    (run_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return md, data
