"""``python -m pretrain.demo``: the whole pipeline on the embedded toy scenes, on the same code path as a cluster.

Steps, each one the command a user would type (printed before it runs):

1. generate the toy scenes (``tools/make_toy_scenes.py``) if absent or written by an older renderer;
2. pretrain SlotCon with ``configs/pretrain/demo_cpu.yaml`` (TensorBoard logs and slot pictures in the run dir),
   with the online evaluation of the held-out scenes every 5 epochs and at the end (:data:`DEMO_EVAL`);
   then draw its curve, with the run's random initialisation as the baseline, into ``online_eval.png``
   (``python -m pretrain.eval.curves RUN --random-init``);
3. unsupervised segmentation of the held-out scenes, pretrained vs the same network at random init
   (``python -m pretrain.eval unsup_seg ... --compare-random``);
4. slot pictures of a few held-out scenes (``tools/visualize_slots.py``);
5. backbone conversion for Detectron2 and MMSegmentation (``tools/convert_to_d2.py``, ``tools/convert_to_mmseg.py``);
6. transfer on the toy scenes' own train/val split: Mask R-CNN + COCO AP (``python -m transfer.detection``)
   and FCN + mIoU (``python -m transfer.segmentation``), each fully fine-tuned and with the backbone frozen,
   each from the pretrained backbone and from random initialisation with the same schedule and seed (the
   two runs of a pair side by side, one thread each: two small processes use two cores better than one);
7. one summary table (also written as ``summary.json`` / ``summary.md``) and the TensorBoard command.

A step that fails stops the demo with the command that failed; artefacts of finished steps stay in place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The demo's online evaluation: the 64 held-out scenes after every 5th epoch and after the last
#: (8 evaluations in 40 epochs; tools/bench_online_eval.py measures what they cost).
DEMO_EVAL = ["eval.every_epochs=5", "eval.at_end=true"]


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


def _progress_bar_override(stream=None) -> list[str]:
    """``log.progress_bar=true`` when the demo's own stdout is a terminal: the child's stdout is the pipe
    that :func:`_run` relays, so its ``auto`` would turn the bar off."""
    stream = sys.stdout if stream is None else stream
    return ["log.progress_bar=true"] if stream.isatty() else []


def _run_pair(cmds: dict[str, list[str]], logs: dict[str, Path], timings: dict[str, float], name: str) -> None:
    """Run two steps side by side with one thread each (outputs go to their logs); stop if either fails."""
    for tag, cmd in cmds.items():
        print(f"\n==> [{name}, {tag}] {shlex.join(cmd)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = {}
    for tag, cmd in cmds.items():
        f = open(logs[tag], "wb")
        procs[tag] = (subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env), f)
    print(f"    running side by side; logs: {', '.join(str(p) for p in logs.values())}", flush=True)
    failed = []
    for tag, (proc, f) in procs.items():
        rc = proc.wait()
        f.close()
        if rc != 0:
            failed.append(f"'{name}, {tag}' failed with exit code {rc}; its output is in {logs[tag]}")
    timings[name] = time.perf_counter() - t0
    print(f"    done in {timings[name]:.0f} s", flush=True)
    if failed:
        raise SystemExit("demo: step " + "; ".join(failed))


def weight_paths(out: Path) -> dict[str, tuple[Path, Path]]:
    """The converted backbones the demo writes to ``out``, by init: ``(Detectron2 .pkl, MMSegmentation .pth)``."""
    return {"pretrained": (out / "backbone_d2.pkl", out / "backbone_mmseg.pth"),
            "random": (out / "random_init_d2.pkl", out / "random_init_mmseg.pth")}


def pair_logs(logs: Path, pair: str, inits: Iterable[str]) -> dict[str, Path]:
    """The log file of each run of a transfer pair (``transfer_runs``' pair name) under ``logs``."""
    return {init: logs / f"{pair.replace(' ', '_')}_{init}.log" for init in inits}


def transfer_runs(py: str, data: Path, out: Path, weights: dict[str, tuple[Path, Path]], iters: int | None = None
                  ) -> dict[str, dict[str, tuple[list[str], Path]]]:
    """The transfer pairs: ``{pair name: {"pretrained" | "random": (command, metrics.json)}}``.

    ``weights[init]`` is ``(Detectron2 .pkl, MMSegmentation .pth)``. Both runs of a pair use the same config,
    schedule and seed; only the backbone's weights differ: the pretrained teacher, or the same encoder as
    pretraining initialised it (what pretraining started from, so the difference is what it learned). Both
    files record the encoder variant (no stem max-pool), which the entry points rebuild. ``iters`` shortens
    both schedules (a quick check, not a comparison).
    """
    det_cfg = {"full": "configs/detection/mask_rcnn_R18_FPN_toy_scenes_demo.yaml",
               "frozen": "configs/detection/mask_rcnn_R18_FPN_toy_scenes_demo_frozen.yaml"}
    seg_cfg = "configs/segmentation/fcn_r18-d16_toy_scenes_demo.py"
    frozen_seg = ["+model.backbone.frozen_stages=4", "+model.backbone.norm_eval=True"]
    short_det = [] if iters is None else ["SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "1",
                                         "TEST.PRECISE_BN.NUM_ITER", "1"]
    short_seg = [] if iters is None else [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
                                         f"default_hooks.checkpoint.interval={iters}", f"param_scheduler.0.end={iters}"]
    runs: dict[str, dict[str, tuple[list[str], Path]]] = {}
    for mode in ("full", "frozen"):
        det, seg = {}, {}
        for init in ("pretrained", "random"):
            d = out / "transfer" / f"det_{mode}_{init}"
            det[init] = ([py, "-m", "transfer.detection", "--config", det_cfg[mode], "--weights", str(weights[init][0]),
                          "--data-root", str(data), "--output-dir", str(d), *short_det],
                         d / "metrics.json")
            d = out / "transfer" / f"seg_{mode}_{init}"
            seg[init] = ([py, "-m", "transfer.segmentation", "--config", seg_cfg, "--weights", str(weights[init][1]),
                          "--data-root", str(data), "--work-dir", str(d),
                          *(frozen_seg if mode == "frozen" else []), *short_seg], d / "metrics.json")
        runs[f"detectron2 {mode}"], runs[f"mmseg {mode}"] = det, seg
    return runs


def _loss_start_end(run_dir: Path) -> tuple[float, float, int]:
    """Mean loss of the first and of the last epoch, read from the run's ``metrics.jsonl``."""
    from pretrain.engine.hooks import metrics_rows

    rows = [r for r in metrics_rows(run_dir / "metrics.jsonl", "train") if "loss" in r and "step" in r]
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


def transfer_metrics(runs: dict[str, dict[str, tuple[list[str], Path]]], ran: bool) -> dict[str, float | None]:
    """``{"det_full_pretrained_AP_b": .., "seg_frozen_random_mIoU": .., ...}`` from the runs' ``metrics.json``;
    None where absent or not run now: with ``--skip-transfer``, metrics left in the folder by an earlier run
    must not pass for this run's."""
    out: dict[str, float | None] = {}
    for pair, by_init in runs.items():
        task, mode = pair.split()
        for init, (_, path) in by_init.items():
            rec = json.loads(path.read_text()) if ran and path.is_file() else {}
            key = f"{'det' if task == 'detectron2' else 'seg'}_{mode}_{init}"
            if task == "detectron2":
                out[f"{key}_AP_b"] = (rec.get("bbox") or {}).get("AP")
                out[f"{key}_AP_m"] = (rec.get("segm") or {}).get("AP")
            else:
                out[f"{key}_mIoU"] = (rec.get("metrics") or {}).get("mIoU")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every step succeeded."""
    ap = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for every artefact (default: runs/demo)")
    ap.add_argument("--data", default="data/toy_scenes", help="toy scenes folder (generated if absent)")
    ap.add_argument("--seed", type=int, default=0, help="pretraining seed")
    ap.add_argument("--skip-transfer", action="store_true", help="stop after evaluation and conversion")
    ap.add_argument("--transfer-iters", type=int, default=None,
                    help="shorten every transfer fine-tune to this many iterations (a quick check, not a comparison)")
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
          f"train.seed={args.seed}", *DEMO_EVAL, *_progress_bar_override(), *args.overrides], logs / "pretrain.log",
         timings, "pretrain")
    # 2b. the online evaluation's curve (none when the run stopped before its first evaluation: train.max_steps)
    curve_png = out / "online_eval.png"
    curve_png.unlink(missing_ok=True)  # an earlier run's picture must not pass for this one's
    from pretrain.engine.eval_hook import FIGURES
    from pretrain.eval.curves import eval_curve

    online = eval_curve(run_dir)  # by epoch, the last row of an epoch winning
    if online:
        _run([py, "-m", "pretrain.eval.curves", str(run_dir), "--random-init", "--out", str(curve_png)],
             logs / "online_eval_curve.log", timings, "online eval curve")
    else:
        print("\n==> [online eval curve] skipped: the run made no online evaluation (it stopped before epoch "
              f"{DEMO_EVAL[0].split('=')[1]})", flush=True)
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
    weights = weight_paths(out)
    d2_weights, mmseg_weights = weights["pretrained"]
    _run([py, "tools/convert_to_d2.py", str(run_dir), str(d2_weights)], logs / "convert_d2.log", timings, "convert d2")
    _run([py, "tools/convert_to_mmseg.py", str(run_dir), str(mmseg_weights)], logs / "convert_mmseg.log", timings,
         "convert mmseg")
    # the transfer baseline: the same encoder as the run initialised it, converted the same way
    random_backbone = out / "random_init_backbone.pth"
    random_weights = weights["random"]
    _run([py, "-m", "pretrain.engine.checkpoint", str(run_dir), str(random_backbone), "--random-init"],
         logs / "export_random_init.log", timings, "export random init")
    _run([py, "tools/convert_to_d2.py", str(random_backbone), str(random_weights[0])],
         logs / "convert_d2_random_init.log", timings, "convert d2 (random init)")
    _run([py, "tools/convert_to_mmseg.py", str(random_backbone), str(random_weights[1])],
         logs / "convert_mmseg_random_init.log", timings, "convert mmseg (random init)")
    runs = transfer_runs(py, data, out, weights, args.transfer_iters)
    if not args.skip_transfer:
        # 6. transfer: pretrained vs random init, full fine-tune and frozen backbone
        for pair, by_init in runs.items():
            _run_pair({init: cmd for init, (cmd, _) in by_init.items()}, pair_logs(logs, pair, by_init), timings,
                      pair)
    timings["total"] = time.perf_counter() - t_start

    # 7. summary
    loss0, loss1, steps = _loss_start_end(run_dir)
    online_last = online[max(online)] if online else {}
    online_random = (json.loads((out / "online_eval_random_init.json").read_text())
                     if online and curve_png.is_file() else {})
    unsup = json.loads(unsup_json.read_text())
    tm = transfer_metrics(runs, ran=not args.skip_transfer)
    summary = {
        "seed": args.seed,
        "pretrain_steps": steps,
        "pretrain_loss_first_epoch": loss0,
        "pretrain_loss_last_epoch": loss1,
        "unsup_miou_pretrained": unsup["pretrained"]["miou"],
        "unsup_miou_random": unsup["random_init"]["miou"],
        "unsup_pacc_pretrained": unsup["pretrained"]["pacc"],
        "unsup_pacc_random": unsup["random_init"]["pacc"],
        **tm,
        "online_eval_epochs": sorted(online),
        "online_eval_last": {k: online_last.get(k) for k in (*FIGURES, "seconds")} if online else {},
        "online_eval_random_init": online_random,
        "seconds": timings,
        "artefacts": {
            "run_dir": str(run_dir), "tensorboard": str(run_dir / "tb"), "slot_pictures": str(pictures),
            "unsup_seg": str(unsup_json), "d2_weights": str(d2_weights), "mmseg_weights": str(mmseg_weights),
            "transfer": str(out / "transfer"),
            **({"online_eval_curve": str(curve_png)} if curve_png.is_file() else {}),
        },
    }
    rows = [
        ("pretrain loss (first -> last epoch)", f"{loss0:.3f} -> {loss1:.3f} ({steps} steps)"),
        ("unsup. seg. mIoU pretrained / random init", f"{_fmt(summary['unsup_miou_pretrained'])} / {_fmt(summary['unsup_miou_random'])}"),
        ("unsup. seg. pAcc pretrained / random init", f"{_fmt(summary['unsup_pacc_pretrained'])} / {_fmt(summary['unsup_pacc_random'])}"),
        ("held-out mIoU / FG-ARI, online eval (last epoch | random init)",
         f"{_fmt(online_last.get('miou'))} / {_fmt(online_last.get('ari_fg'))} | "
         f"{_fmt(online_random.get('miou'))} / {_fmt(online_random.get('ari_fg'))}"
         + (f" (curve: {curve_png})" if curve_png.is_file() else "")),
        *[(f"Mask R-CNN AP^b / AP^m, {mode} ({'backbone frozen' if mode == 'frozen' else 'fine-tuned'}): "
           "pretrained | random",
           f"{_fmt(tm[f'det_{mode}_pretrained_AP_b'])} / {_fmt(tm[f'det_{mode}_pretrained_AP_m'])} | "
           f"{_fmt(tm[f'det_{mode}_random_AP_b'])} / {_fmt(tm[f'det_{mode}_random_AP_m'])}")
          for mode in ("full", "frozen")],
        *[(f"FCN mIoU, {mode} ({'backbone frozen' if mode == 'frozen' else 'fine-tuned'}): pretrained | random",
           f"{_fmt(tm[f'seg_{mode}_pretrained_mIoU'])} | {_fmt(tm[f'seg_{mode}_random_mIoU'])}")
          for mode in ("full", "frozen")],
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
