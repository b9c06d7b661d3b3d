"""``python -m pretrain.demo``: the whole pipeline on the embedded toy scenes, on the same code path as a cluster.

Steps, each one the command a user would type (printed before it runs):

1. generate the toy scenes (``tools/make_toy_scenes.py``) if absent or written by an older renderer;
2. pretrain SlotCon with ``configs/pretrain/demo_cpu.yaml`` (TensorBoard logs and slot pictures in the run dir);
3. unsupervised segmentation of the held-out scenes, pretrained vs the same network at random init
   (``python -m pretrain.eval unsup_seg ... --compare-random``);
4. slot pictures of a few held-out scenes (``tools/visualize_slots.py``);
5. backbone conversion for Detectron2 and MMSegmentation (``tools/convert_to_d2.py``, ``tools/convert_to_mmseg.py``);
6. a short Mask R-CNN fine-tune + COCO evaluation (``python -m transfer.detection``) and a short FCN
   fine-tune + mIoU on the toy scenes in the VOC layout (``python -m transfer.segmentation``);
7. one summary table (also written as ``summary.json`` / ``summary.md``) and the TensorBoard command.

A step that fails stops the demo with the command that failed; artefacts of finished steps stay in place.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path, timings: dict[str, float], name: str) -> None:
    """Run one step as a subprocess, teeing its output to ``log``; stop the demo if it fails."""
    print(f"\n==> [{name}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        # Raw chunks, not lines: progress bars redraw in place with \r and stay one line on the terminal.
        while chunk := proc.stdout.read1(65536):
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        rc = proc.wait()
    timings[name] = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"demo: step '{name}' failed with exit code {rc}; its output is in {log}")


def _loss_start_end(run_dir: Path) -> tuple[float, float, int]:
    """Mean loss of the first and of the last epoch, read from the run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    first_epoch, last_epoch = rows[0]["epoch"], rows[-1]["epoch"]
    first = [r["loss"] for r in rows if r["epoch"] == first_epoch]
    last = [r["loss"] for r in rows if r["epoch"] == last_epoch]
    return sum(first) / len(first), sum(last) / len(last), rows[-1]["step"] + 1


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def toy_scenes_command(py: str, data: Path) -> list[str] | None:
    """The command that (re)writes the toy scenes at ``data``, or None when they are current.

    Absent: the default set. Written by an older renderer (``meta.json``'s version): the same set
    (sizes and seed from its meta) rendered anew, which a bare existence check would silently reuse.
    """
    from pretrain.data.toy_scenes import TOY_VERSION, load_meta

    cmd = [py, "tools/make_toy_scenes.py", str(data)]
    if not (data / "meta.json").is_file():
        return cmd
    meta = load_meta(data)
    if meta.get("version") == TOY_VERSION:
        return None
    for key, flag in (("n_train", "--n-train"), ("n_val", "--n-val"), ("size", "--size"), ("seed", "--seed")):
        if isinstance(meta.get(key), int):
            cmd += [flag, str(meta[key])]
    return cmd


def transfer_metrics(det_dir: Path, seg_dir: Path, ran: bool) -> tuple[dict, dict]:
    """The transfer steps' ``metrics.json`` contents, or empty dicts where absent or not run now: with
    ``--skip-transfer``, metrics left in the folder by an earlier run must not pass for this run's."""
    def read(d: Path) -> dict:
        f = d / "metrics.json"
        return json.loads(f.read_text()) if ran and f.exists() else {}

    return read(det_dir), read(seg_dir)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every step succeeded."""
    ap = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for every artefact (default: runs/demo)")
    ap.add_argument("--data", default="data/toy_scenes", help="toy scenes folder (generated if absent)")
    ap.add_argument("--seed", type=int, default=0, help="pretraining seed")
    ap.add_argument("--skip-transfer", action="store_true", help="stop after evaluation and conversion")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for the pretraining config")
    args = ap.parse_args(argv)

    py = sys.executable
    out = (ROOT / args.out).resolve()
    data = (ROOT / args.data).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. data
    toy_cmd = toy_scenes_command(py, data)
    if toy_cmd is not None:
        _run(toy_cmd, logs / "toy_scenes.log", timings, "toy scenes")
    # 2. pretraining (auto-resume makes a re-run continue instead of starting over)
    run_dir = out / f"pretrain_seed{args.seed}"
    _run([py, "-m", "pretrain", "configs/pretrain/demo_cpu.yaml", f"data.root={data}", f"train.run_dir={run_dir}",
          f"train.seed={args.seed}", *args.overrides], logs / "pretrain.log", timings, "pretrain")
    # 3. unsupervised segmentation, pretrained vs random init
    unsup_json = out / "unsup_seg.json"
    _run([py, "-m", "pretrain.eval", "unsup_seg", str(run_dir), str(data), "--compare-random", "--out", str(unsup_json)],
         logs / "unsup_seg.log", timings, "unsup seg")
    # 4. slot pictures
    val_images = sorted((data / "val2017").glob("*.jpg"))[:4]
    pictures = out / "slot_pictures"
    _run([py, "tools/visualize_slots.py", str(run_dir), *map(str, val_images), "--out", str(pictures)],
         logs / "visualize.log", timings, "slot pictures")
    # 5. conversion
    d2_weights, mmseg_weights = out / "backbone_d2.pkl", out / "backbone_mmseg.pth"
    _run([py, "tools/convert_to_d2.py", str(run_dir), str(d2_weights)], logs / "convert_d2.log", timings, "convert d2")
    _run([py, "tools/convert_to_mmseg.py", str(run_dir), str(mmseg_weights)], logs / "convert_mmseg.log", timings,
         "convert mmseg")
    det_dir, seg_dir = out / "detectron2", out / "mmseg_voc"
    if not args.skip_transfer:
        # 6. transfer
        _run([py, "-m", "transfer.detection", "--config", "configs/detection/mask_rcnn_FPN_smoke_cpu.yaml",
              "--weights", str(d2_weights), "--data-root", str(data), "--output-dir", str(det_dir)],
             logs / "detectron2.log", timings, "detectron2")
        voc_root = data.parent / (data.name + "_voc")
        if not (voc_root / "VOCdevkit").exists():
            from transfer.segmentation.toy_layouts import make_voc

            make_voc(voc_root, n_train=16, n_aug=16, n_val=8, size=64)
        _run([py, "-m", "transfer.segmentation", "--config", "configs/segmentation/fcn_d6_r50-d16_voc12aug_smoke.py",
              "--weights", str(mmseg_weights), "--data-root", str(voc_root / "VOCdevkit" / "VOC2012"),
              "--work-dir", str(seg_dir), "model.backbone.depth=18", "model.decode_head.in_channels=512"],
             logs / "mmseg.log", timings, "mmseg")
    timings["total"] = time.perf_counter() - t_start

    # 7. summary
    loss0, loss1, steps = _loss_start_end(run_dir)
    unsup = json.loads(unsup_json.read_text())
    det, seg = transfer_metrics(det_dir, seg_dir, ran=not args.skip_transfer)
    summary = {
        "seed": args.seed,
        "pretrain_steps": steps,
        "pretrain_loss_first_epoch": loss0,
        "pretrain_loss_last_epoch": loss1,
        "unsup_miou_pretrained": unsup["pretrained"]["miou"],
        "unsup_miou_random": unsup["random_init"]["miou"],
        "unsup_pacc_pretrained": unsup["pretrained"]["pacc"],
        "unsup_pacc_random": unsup["random_init"]["pacc"],
        "det_bbox_AP": (det.get("bbox") or {}).get("AP"),
        "det_segm_AP": (det.get("segm") or {}).get("AP"),
        "seg_mIoU": (seg.get("metrics") or {}).get("mIoU"),
        "seconds": timings,
        "artefacts": {
            "run_dir": str(run_dir), "tensorboard": str(run_dir / "tb"), "slot_pictures": str(pictures),
            "unsup_seg": str(unsup_json), "d2_weights": str(d2_weights), "mmseg_weights": str(mmseg_weights),
            "detectron2": str(det_dir), "mmseg": str(seg_dir),
        },
    }
    rows = [
        ("pretrain loss (first -> last epoch)", f"{loss0:.3f} -> {loss1:.3f} ({steps} steps)"),
        ("unsup. seg. mIoU pretrained / random init", f"{_fmt(summary['unsup_miou_pretrained'])} / {_fmt(summary['unsup_miou_random'])}"),
        ("unsup. seg. pAcc pretrained / random init", f"{_fmt(summary['unsup_pacc_pretrained'])} / {_fmt(summary['unsup_pacc_random'])}"),
        ("Detectron2 Mask R-CNN AP^b / AP^m (toy, smoke)", f"{_fmt(summary['det_bbox_AP'])} / {_fmt(summary['det_segm_AP'])}"),
        ("MMSeg FCN mIoU (toy VOC layout, smoke)", _fmt(summary["seg_mIoU"])),
        ("run dir (checkpoints, log, config)", str(run_dir)),
        ("slot pictures", str(pictures)),
        ("Detectron2 / MMSeg weights", f"{d2_weights} / {mmseg_weights}"),
        ("wall time", f"{timings['total']:.0f} s (pretrain {timings['pretrain']:.0f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nTensorBoard: tensorboard --logdir {run_dir / 'tb'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
