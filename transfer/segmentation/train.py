"""MMSegmentation fine-tuning / evaluation of a converted backbone (SlotCon Sec. 4.2, semantic segmentation).

One entry point for the three protocols (configs/segmentation/): builds the mmengine Runner from a
config, the converted weights (tools/convert_to_mmseg.py) and ``key=value`` overrides; checks the
dataset layout; refuses weights that would leave any backbone key random; writes metrics JSON.
Same code path on a laptop (CPU, one process, BN) and on a cluster (torchrun or SLURM, NCCL, SyncBN).

No input file runs code: the converted ``--weights``, the ``--eval-only`` checkpoint and the checkpoint
``--resume`` continues are read with ``torch.load(weights_only=True)`` (``transfer.checkpoint_io``) before
the Runner is built (an unusable or non-finite file exits 2 naming it), and mmengine's own local
loader is replaced by the same reader (``compat``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import compat  # noqa: F401  (must precede mmseg imports)

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import print_log  # noqa: E402

from transfer.checkpoint_io import CheckpointError  # noqa: E402

from .layout import check_layouts  # noqa: E402
from .weights import check_checkpoint, check_weights_fit_config, load_converted  # noqa: E402

LAUNCHERS = ("none", "pytorch", "slurm")


class SetupError(RuntimeError):
    """The run cannot start: bad override, missing dataset files, weights that do not fit; the message says which."""


@dataclass
class SegArgs:
    """Command-line arguments of ``python -m transfer.segmentation``."""

    config: str
    weights: str | None = None
    gpus: int | None = None
    launcher: str = "none"
    resume: bool = False
    eval_only: bool = False
    checkpoint: str | None = None
    data_root: str | None = None
    work_dir: str | None = None
    overrides: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transfer.segmentation",
        description="Fine-tune (or evaluate) an MMSegmentation FCN from a converted pretrained backbone.",
    )
    p.add_argument("--config", required=True, help="configs/segmentation/*.py (MMSegmentation 1.x)")
    p.add_argument("--weights", help="backbone from tools/convert_to_mmseg.py, or 'random' for the random-init baseline")
    p.add_argument("--gpus", type=int, help="total GPUs; with --launcher none and G>1 the job re-launches itself via torchrun")
    p.add_argument("--launcher", choices=LAUNCHERS, default="none")
    p.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in the work dir")
    p.add_argument("--eval-only", action="store_true", help="evaluate a fine-tuned model on the test split")
    p.add_argument("--checkpoint", help="--eval-only: fine-tuned checkpoint (default: the work dir's last)")
    p.add_argument("--data-root", help="dataset root; replaces data_root of every dataset in the config")
    p.add_argument("--work-dir", help="default: work_dirs/<config name>")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train_cfg.max_iters=1000")
    return p


def parse_args(argv: list[str] | None = None) -> SegArgs:
    ns = build_parser().parse_args(argv)
    return SegArgs(
        config=ns.config, weights=ns.weights, gpus=ns.gpus, launcher=ns.launcher, resume=ns.resume,
        eval_only=ns.eval_only, checkpoint=ns.checkpoint, data_root=ns.data_root, work_dir=ns.work_dir,
        overrides=list(ns.overrides),
    )


# ----------------------------------------------------------------------------- config editing

def _lookup(cfg: Any, dotted: str) -> tuple[bool, Any]:
    node = cfg._cfg_dict if isinstance(cfg, Config) else cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _type_ok(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return True
    return isinstance(new, type(old))


def parse_overrides(cfg: Config, items: list[str]) -> dict[str, Any]:
    """``key=value`` strings -> dict for ``cfg.merge_from_dict``.

    Values are parsed as mmengine's ``--cfg-options`` does (numbers, bools, lists, tuples). A key the
    config does not have, or a value of another type, is an error naming the key; prefix ``+`` to add a key.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = DictAction._parse_iterable(raw)
        if key.startswith("+"):
            out[key[1:]] = value
            continue
        found, old = _lookup(cfg, key)
        if not found:
            raise KeyError(f"unknown config key {key!r} in override {item!r} (prefix '+' to add a new key)")
        if not _type_ok(old, value):
            raise TypeError(f"config key {key!r} is {type(old).__name__} ({old!r}); override gives "
                            f"{type(value).__name__} ({value!r})")
        out[key] = value
    return out


def _walk(node: Any, fn) -> None:
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _walk(v, fn)


def set_norm(cfg: Config, use_syncbn: bool) -> int:
    """SyncBN where it can run (CUDA and more than one process), plain BN otherwise (DESIGN.md).

    Returns how many norm layers were switched from SyncBN to BN.
    """
    changed = 0

    def fix(d: dict) -> None:
        nonlocal changed
        if d.get("type") == "SyncBN":
            d["type"] = "BN"
            changed += 1

    if not use_syncbn:
        _walk(cfg._cfg_dict, fix)
    return changed


def set_data_root(cfg: Config, root: str) -> None:
    """Point every dataset (including ConcatDataset members) at ``root``."""
    def fix(d: dict) -> None:
        if "data_root" in d and "type" in d:
            d["data_root"] = root

    if "data_root" in cfg:
        cfg.data_root = root
    for role in ("train", "val", "test"):
        if cfg.get(f"{role}_dataloader") is not None:
            _walk(cfg[f"{role}_dataloader"], fix)


def world_size_of(launcher: str) -> int:
    """Number of processes the launcher will start (before torch.distributed is initialised)."""
    if launcher == "pytorch":
        return int(os.environ.get("WORLD_SIZE", "1"))
    if launcher == "slurm":
        if "SLURM_NTASKS" not in os.environ:
            raise RuntimeError("--launcher slurm outside a SLURM job step (SLURM_NTASKS is not set)")
        return int(os.environ["SLURM_NTASKS"])
    return 1


def build_config(args: SegArgs, converted: tuple[dict, dict] | None = None) -> Config:
    """The effective config: file + overrides + launcher, batch split, norm, weights, data root, work dir.

    ``converted`` is ``load_converted(args.weights)`` when the caller already read the weights (their
    encoder variant is carried into ``model.backbone``); otherwise the file is read here if it exists.
    """
    cfg = Config.fromfile(args.config)
    if args.overrides:
        cfg.merge_from_dict(parse_overrides(cfg, args.overrides))
    world = world_size_of(args.launcher)
    if args.gpus is not None and args.launcher != "none" and args.gpus != world:
        raise ValueError(f"--gpus {args.gpus} but the {args.launcher} launcher starts {world} processes")
    cuda = torch.cuda.is_available()
    cfg.launcher = args.launcher
    cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "nccl" if cuda else "gloo"
    if set_norm(cfg, use_syncbn=cuda and world > 1):
        print_log(f"SyncBN -> BN: {'no CUDA' if not cuda else 'a single process'}", logger="current")
    if world > 1 and not cuda:
        # mmengine hands DDP device_ids=[LOCAL_RANK], which DDP rejects for a CPU module (gloo runs).
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)

    total = int(cfg.get("total_batch_size", cfg.train_dataloader.batch_size * world))
    if total % world:
        raise ValueError(f"total_batch_size {total} is not divisible by the {world} processes")
    cfg.train_dataloader.batch_size = total // world
    cfg.total_batch_size = total

    if args.data_root:
        set_data_root(cfg, args.data_root)
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or str(Path("work_dirs") / Path(args.config).stem)

    backbone = cfg.model.backbone
    if args.eval_only:
        backbone.init_cfg = None  # the fine-tuned checkpoint provides every weight
        ckpt = args.checkpoint
        if ckpt is None:
            last = Path(cfg.work_dir) / "last_checkpoint"
            if not last.is_file():
                raise FileNotFoundError(f"--eval-only: no --checkpoint and no {last} to evaluate")
            ckpt = last.read_text().strip()
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"--eval-only: checkpoint {ckpt} not found")
        cfg.load_from = ckpt
        cfg.resume = False
    else:
        if args.weights is None:
            raise ValueError("--weights is required for training (a converted backbone, or 'random' for the "
                             "random-init baseline)")
        if args.weights == "random":
            backbone.init_cfg = None
        else:
            backbone.init_cfg = dict(type="Pretrained", checkpoint=str(Path(args.weights).resolve()))
            if converted is None and Path(args.weights).is_file():  # run() reports a missing file
                converted = load_converted(args.weights)
            if converted is not None:
                meta = converted[1]
                from .backbones import carry_encoder_variant

                note = carry_encoder_variant(backbone, meta.get("encoder") or {})
                if note:
                    print_log(note, logger="current")
        cfg.resume = bool(args.resume)
    return cfg


# ----------------------------------------------------------------------------- running

def _relaunch_with_torchrun(argv: list[str], gpus: int) -> int:
    """``--launcher none --gpus G``: start G local processes through torchrun (same code path as a cluster)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}", "-m", "transfer.segmentation",
           *argv, "--launcher", "pytorch"]
    return subprocess.call(cmd)


def find_resume_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint mmengine's resume continues: the path ``work_dir/last_checkpoint`` holds (as is), or None."""
    tag = Path(work_dir) / "last_checkpoint"
    return Path(tag.read_text().strip()) if tag.is_file() else None


def run(args: SegArgs) -> dict[str, Any]:
    """Train (or evaluate) and return the last metrics record (also written to the work dir as JSON)."""
    from mmengine.runner import Runner
    from mmseg.utils import register_all_modules

    from . import backbones, toy_scenes  # noqa: F401  (register ResNetStemVariant and ToyScenesDataset)
    from .hooks import MetricsJsonHook, PreemptionHook, VerifyBackboneHook

    register_all_modules(init_default_scope=False)
    roles = ("test",) if args.eval_only else ("train", "val")
    weights = converted = None
    try:
        if not args.eval_only and args.weights not in (None, "random"):
            weights = str(Path(args.weights).resolve())
            converted = load_converted(weights)  # the one read before mmengine's Pretrained init
        cfg = build_config(args, converted)
        counts = check_layouts(cfg, roles)
        if converted is not None:
            check_weights_fit_config(weights, cfg.model.backbone, converted)  # stops before building anything heavy
        # The whole-model checkpoint mmengine will load, as its Runner.load_or_resume picks it.
        if cfg.get("load_from"):
            check_checkpoint(cfg.load_from, "--eval-only" if args.eval_only else "load_from")
        elif cfg.resume and (resume := find_resume_checkpoint(cfg.work_dir)) is not None:
            check_checkpoint(resume, "--resume")
    except (KeyError, TypeError, ValueError, OSError, CheckpointError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise SetupError(msg) from exc

    runner = Runner.from_cfg(cfg)
    info = {"config": str(args.config), "weights": weights if not args.eval_only else cfg.load_from,
            "dataset": cfg[f"{roles[0]}_dataloader"]["dataset"]["type"], "images": counts,
            "world_size": world_size_of(args.launcher), "total_batch_size": cfg.total_batch_size}
    runner.register_hook(MetricsJsonHook(info), priority="LOW")
    runner.register_hook(PreemptionHook(), priority="VERY_LOW")
    if weights is not None:
        runner.register_hook(VerifyBackboneHook(weights, converted[0]), priority="VERY_HIGH")
    del converted  # the hook holds the state until it has compared it
    work = Path(runner.work_dir)
    if args.eval_only:
        metrics = runner.test()
        return json.loads((work / "test_metrics.json").read_text()) if (work / "test_metrics.json").is_file() \
            else {"metrics": metrics}
    runner.train()
    path = work / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.launcher == "none" and args.gpus and args.gpus > 1:
            if not args.eval_only and args.weights not in (None, "random"):
                try:  # refused once here rather than by every process torchrun starts
                    load_converted(args.weights)
                except CheckpointError as exc:
                    raise SetupError(str(exc)) from exc
            return _relaunch_with_torchrun(argv, args.gpus)
        record = run(args)
    except SetupError as exc:
        print("python -m transfer.segmentation: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    if record.get("metrics"):
        print(json.dumps(record["metrics"]))
    return 0
