"""``python -m pretrain.eval TASK CKPT DATA [options]``: evaluate a pretraining checkpoint.

TASK: ``unsup_seg`` (SlotCon Sec. 4.4), ``discovery`` (ARI-FG, Otsu mIoU), ``retrieval`` (Sec. 4.6).
CKPT: a full training checkpoint (docs/contracts.md: ``model`` + ``config``), a run directory
(its newest good checkpoint), or an official SlotCon release checkpoint (e.g. ``slotcon_coco_r50_800ep.pth``:
its teacher ``encoder_k``/``projector_k``/``grouping_k`` and centre, in this project's SlotCon).
A checkpoint that cannot be used is refused with one line on stderr and exit status 2.
DATA: a toy-scenes root (has ``meta.json``) or a COCO-Stuff root (``images/``, ``annotations/``).

Writes a JSON result (``--out``, default ``<ckpt dir>/eval/<task>.json``) and prints it.
``--random-init`` evaluates the same network untrained; ``--compare-random`` evaluates both.

Examples::

    python -m pretrain.eval unsup_seg runs/demo_cpu data/toy_scenes --compare-random
    python -m pretrain.eval unsup_seg ckpt.pt /data/cocostuff --resolution 320
    python -m pretrain.eval retrieval ckpt.pt /data/cocostuff --file-list "" --max-images 5000
    python -m pretrain.eval unsup_seg slotcon_coco_r50_800ep.pth /data/cocostuff
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from transfer.checkpoint_io import CheckpointError, refuse

from .inference import default_device, load_method, resolve_checkpoint

TASKS = ("unsup_seg", "discovery", "retrieval")


def detect_dataset(root: Path) -> str:
    """``toy`` if ``root/meta.json`` exists, ``cocostuff`` if ``root/images`` does; else an error."""
    if (root / "meta.json").is_file():
        return "toy"
    if (root / "images").is_dir():
        return "cocostuff"
    raise FileNotFoundError(f"{root}: neither a toy-scenes root (meta.json) nor a COCO-Stuff root (images/)")


def build_dataset(task: str, kind: str, root: Path, args: argparse.Namespace):
    """The evaluation dataset of a task: semantic labels for unsup_seg/retrieval, instances for discovery."""
    from .datasets import ToyInstances, ToySemantic

    res = args.resolution if args.resolution is not None else (None if kind == "toy" else 320)
    if res == 0:
        res = None
    if kind == "toy":
        if task == "discovery":
            ds = ToyInstances(root, args.split, res)
        else:
            ds = ToySemantic(root, args.split, res, ignore_background=args.ignore_background)
    elif kind == "cocostuff":
        if task == "discovery":
            raise ValueError("discovery needs instance masks; COCO-Stuff semantic maps have none (use toy scenes)")
        from .cocostuff import DEFAULT_FILE_LIST, CocoStuff27

        fl = DEFAULT_FILE_LIST if args.file_list is None else (args.file_list or None)
        ds = CocoStuff27(root, args.split, res, file_list=fl)
    else:
        raise ValueError(f"unknown dataset kind {kind!r} (toy | cocostuff)")
    if args.max_images:
        ds.images, ds.labels = ds.images[: args.max_images], ds.labels[: args.max_images]
    return ds


def run_task(task: str, method, dataset, args: argparse.Namespace, out_dir: Path, tag: str) -> dict:
    """Run one task on one network; retrieval also writes its PNG grids under ``out_dir``."""
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device_obj,
              amp=not args.no_amp, progress=not args.no_progress)
    if task == "unsup_seg":
        from .unsup_seg import evaluate_unsup_seg

        return evaluate_unsup_seg(method, dataset, **kw)
    if task == "discovery":
        from .discovery import evaluate_discovery

        return evaluate_discovery(method, dataset, active_only=not args.all_maps, **kw)
    from .retrieval import retrieve_segments, save_retrieval_grids

    result = retrieve_segments(method, dataset, topk=args.topk, **kw)
    files = save_retrieval_grids(result, dataset, out_dir / f"retrieval{tag}", overview=args.overview)
    return {"num_segments": int(result.seg_image.numel()), "num_prototypes": int(result.top_index.shape[0]),
            "overview": files["overview"], "dir": files["dir"], "num_grids": len(files["files"])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--dataset", choices=("auto", "toy", "cocostuff"), default="auto")
    p.add_argument("--split", default="val2017")
    p.add_argument("--resolution", type=int, default=None,
                   help="inference size (shorter side + centre crop); default 320 for COCO-Stuff, native for toy; 0 = native")
    p.add_argument("--file-list", default=None,
                   help="COCO-Stuff curated list relative to DATA (default: IIC's Coco164kFull_Stuff_Coarse_7.txt; '' = all images)")
    p.add_argument("--ignore-background", action="store_true", help="toy unsup_seg: background is not a class")
    p.add_argument("--all-maps", action="store_true", help="discovery: Otsu-match all K maps, not only active ones")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--overview", type=int, default=16, help="retrieval: prototypes in overview.png")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: 0 on CPU, min(8, cores) on CUDA)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--random-init", action="store_true", help="evaluate the same network untrained")
    g.add_argument("--compare-random", action="store_true", help="evaluate trained and untrained")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random initialisation (default: the run's train.seed, i.e. its starting weights)")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default <ckpt dir>/eval/<task>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the task and return the result written to JSON.

    Raises CheckpointError (``pretrain.eval.inference.CheckpointRefused``) for an unusable checkpoint;
    :func:`cli` turns it into exit status 2.
    """
    args = parse_args(argv)
    args.device_obj = torch.device(args.device) if args.device else default_device()
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if args.device_obj.type == "cuda" else 0
    ckpt_path = resolve_checkpoint(args.checkpoint)  # a missing checkpoint stops before the dataset is read
    kind = detect_dataset(args.data) if args.dataset == "auto" else args.dataset
    dataset = build_dataset(args.task, kind, args.data, args)
    # default output next to the run: <run>/eval for a run dir, <checkpoints dir>/eval for a file
    ckpt_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    out = args.out or (ckpt_dir / "eval" / f"{args.task}{'_random' if args.random_init else ''}.json")
    out_dir = out.parent
    runs = [("random_init", True)] if args.random_init else [("pretrained", False)]
    if args.compare_random:
        runs.append(("random_init", True))
    result: dict = {"task": args.task, "checkpoint": str(ckpt_path), "data": str(args.data),
                    "dataset": kind, "split": args.split, "num_images": len(dataset),
                    "resolution": getattr(dataset, "resolution", None)}
    for name, random_init in runs:
        method, cfg = load_method(args.checkpoint, args.device_obj, random_init=random_init, seed=args.seed)
        result.setdefault("model", cfg.get("model", {}))
        result[name] = run_task(args.task, method, dataset, args, out_dir, "_random" if random_init else "")
        del method
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "model"}
    for name, _ in runs:
        summary[name] = {k: v for k, v in result[name].items() if k not in ("mapping",)}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return result


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` as a command: 0 on success, 2 with ``refused: <reason>`` (one line) for a bad checkpoint."""
    try:
        main(argv)
    except CheckpointError as exc:
        return refuse(exc)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
