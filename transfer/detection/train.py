"""Mask R-CNN R50-FPN fine-tuning and COCO evaluation with Detectron2 (SlotCon Sec. 4.2 protocol).

    python -m transfer.detection --config configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml \
        --weights teacher_r50.pkl --data-root datasets/coco --num-gpus 8 [KEY VALUE ...]

One code path for a laptop and a cluster: Detectron2's DefaultTrainer (through ``launch``, NCCL on
GPUs), evaluation with the official pycocotools (``use_fast_impl=False``), SyncBN replaced by BN where
it cannot run (CPU, or a single process). Pretrained weights are loaded strictly: a backbone key that
would stay randomly initialised stops the run before training. The final bbox/segm AP are written to
``OUTPUT_DIR/metrics.json`` (Detectron2's per-iteration log goes to ``train_metrics.json``).

No input file runs code: every weights file (``--weights``, the ``--resume`` checkpoint) is read with
``transfer.detection.convert.read_d2_weights`` (numpy-only unpickler for ``.pkl``, ``weights_only`` torch.load
otherwise), first by ``main`` (a refused or non-finite file exits 2 naming it), then by each rank's
checkpointer, which replaces Detectron2's plain-pickle reader. In a single process the rank takes over
the record ``main`` validated instead of reading the file again.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import transfer.detection.compat  # noqa: F401  (must precede Detectron2's imports: Pillow/numpy aliases)
import detectron2
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from transfer.checkpoint_io import CheckpointError
from transfer.detection.backbones import add_stem_pool_key, check_stem
from transfer.detection.convert import encoder_meta, read_d2_weights
from transfer.detection.datasets import coco_paths, default_data_root, register_coco

# A child of Detectron2's logger, so that default_setup's handlers (console + log.txt) print it.
logger = logging.getLogger("detectron2.transfer")

SCRATCH = "scratch"  # --weights value for a randomly initialised backbone (a baseline), said out loud


class BackboneWeightsError(RuntimeError):
    """Pretrained weights that would leave part of the backbone randomly initialised."""


# The record main() validated, keyed by the file's absolute path and (mtime, size), for the rank of a
# single-process run to load instead of reading the same file again; taken (and dropped) on first use.
_VALIDATED: dict[str, tuple[tuple[int, int], dict]] = {}


def _file_key(path: str | Path) -> tuple[str, tuple[int, int]]:
    st = os.stat(path)
    return os.path.abspath(path), (st.st_mtime_ns, st.st_size)


def _hand_over(path: str | Path, record: dict) -> None:
    name, stamp = _file_key(path)
    _VALIDATED.clear()
    _VALIDATED[name] = (stamp, record)


def _take_over(path: str | Path) -> dict | None:
    try:
        name, stamp = _file_key(path)
    except OSError:
        return None
    held = _VALIDATED.pop(name, None)
    return held[1] if held is not None and held[0] == stamp else None


class StrictBackboneCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that reads files without running code and refuses a partial backbone load.

    Detectron2 only logs missing keys and silently skips wrongly shaped ones; for a transfer
    benchmark that would measure a partly random backbone, so both are errors here. With
    ``require_all`` (evaluating a finished detector) every model key must be loaded.
    """

    def _load_file(self, filename: str) -> dict:
        # Detectron2 unpickles .pkl files with plain pickle and fvcore calls torch.load with the
        # installed torch's default (weights_only only from torch 2.6): a crafted file would run code.
        return _take_over(filename) or read_d2_weights(filename)

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, require_all: bool = False, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.require_all = require_all
        self.loaded_backbone_keys: list[str] = []

    def _backbone_prefix(self) -> str:
        keys = self.model.state_dict().keys()
        return "backbone.bottom_up." if any(k.startswith("backbone.bottom_up.") for k in keys) else "backbone."

    def _load_model(self, checkpoint: dict) -> Any:
        incompatible = super()._load_model(checkpoint)
        prefix = "" if self.require_all else self._backbone_prefix()
        # BN step counters are bookkeeping, never trained weights; converted backbones omit them.
        missing = sorted(
            k for k in incompatible.missing_keys if k.startswith(prefix) and not k.endswith("num_batches_tracked")
        )
        bad = sorted(f"{k}: {s_ckpt} in file, {s_model} in model" for k, s_ckpt, s_model in incompatible.incorrect_shapes
                     if k.startswith(prefix))
        if missing or bad:
            what = "model" if self.require_all else "backbone"
            raise BackboneWeightsError(
                f"the weights leave {len(missing) + len(bad)} {what} tensors randomly initialised; refusing to "
                f"train/evaluate. Missing: {missing[:6]}{' ...' if len(missing) > 6 else ''}; wrong shape: {bad[:4]}. "
                "Check that MODEL.RESNETS.DEPTH (and RES2_OUT_CHANNELS=64 for ResNet-18/34) match the "
                "converted checkpoint (tools/convert_to_d2.py prints its depth), and that a pretraining "
                "checkpoint was converted with tools/convert_to_d2.py first."
            )
        self.loaded_backbone_keys = sorted(
            k for k in self.model.state_dict() if k.startswith(self._backbone_prefix())
            and not k.endswith("num_batches_tracked")
        )
        return incompatible


class Trainer(DefaultTrainer):
    """DefaultTrainer with the COCO evaluator, a strict checkpointer and a class-count check."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> COCOEvaluator:
        # use_fast_impl=False: the official pycocotools (the fast C++ version needs detectron2._C).
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
                             use_fast_impl=False)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        loader = super().build_train_loader(cfg)  # loads the annotations, which fills thing_classes
        n = len(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes)
        if n != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"dataset {cfg.DATASETS.TRAIN[0]} has {n} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; pass MODEL.ROI_HEADS.NUM_CLASSES {n}"
            )
        return loader

    def build_hooks(self):
        # DefaultTrainer.__init__ creates its checkpointer right before calling build_hooks; swap in
        # the strict one here so that the PeriodicCheckpointer hook and resume_or_load share it.
        plain = self.checkpointer
        self.checkpointer = StrictBackboneCheckpointer(plain.model, plain.save_dir, trainer=weakref.proxy(self))
        return super().build_hooks()

    def build_writers(self):
        # Detectron2 names its per-iteration log metrics.json; that name is kept for the final AP.
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "train_metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of ``python -m transfer.detection``."""
    p = argparse.ArgumentParser(
        prog="python -m transfer.detection",
        description="Detectron2 Mask R-CNN fine-tuning + COCO evaluation of a converted backbone.",
    )
    p.add_argument("--config", required=True, help="Detectron2 YAML (configs/detection/*.yaml)")
    p.add_argument("--weights", required=True,
                   help=f"tools/convert_to_d2.py output (.pkl), a Detectron2 checkpoint (.pth) or '{SCRATCH}'")
    p.add_argument("--data-root", default=None, help="COCO root (annotations/, train2017/, val2017/); "
                   "default $DETECTRON2_DATASETS/coco or datasets/coco")
    p.add_argument("--output-dir", default=None, help="run folder (default: the config's OUTPUT_DIR)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint if present")
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights (a trained detector) only")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 ('auto' on one machine)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return p


def _replace_syncbn(node: CfgNode) -> list[str]:
    changed = []
    for key, value in node.items():
        if isinstance(value, CfgNode):
            changed += [f"{key}.{k}" for k in _replace_syncbn(value)]
        elif key == "NORM" and value == "SyncBN":
            node[key] = "BN"
            changed.append(key)
    return changed


def setup_cfg(args: argparse.Namespace) -> CfgNode:
    """The effective config: defaults <- YAML <- command line, then device and norm fixed up."""
    cfg = get_cfg()
    add_stem_pool_key(cfg)
    cfg.merge_from_file(args.config)
    if args.opts:
        cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = "" if args.weights == SCRATCH else args.weights
    if args.output_dir:
        cfg.OUTPUT_DIR = args.output_dir
    stem_pool = None
    if cfg.MODEL.WEIGHTS and not args.eval_only:
        # main() passes the record of the file it validated (ranks get it with args); a direct caller
        # gets it read here. A missing file is reported by main()'s input checks; a Detectron2 .pth
        # checkpoint records no variant.
        encoder = getattr(args, "weights_encoder", None)
        if encoder is None and Path(cfg.MODEL.WEIGHTS).is_file():
            encoder = encoder_meta(read_d2_weights(cfg.MODEL.WEIGHTS))
        stem_pool = (encoder or {}).get("stem_pool")
    check_stem(cfg, stem_pool, cfg.MODEL.WEIGHTS)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    world = args.num_gpus * args.num_machines
    # SyncBN needs CUDA and a process group with more than one rank; elsewhere it is plain BN.
    if cfg.MODEL.DEVICE == "cpu" or world == 1:
        args.syncbn_replaced = _replace_syncbn(cfg.MODEL)  # logged by run() once logging is set up
    cfg.freeze()
    return cfg


def _finite(obj: Any) -> Any:
    # pycocotools yields NaN for categories without ground truth; strict JSON has no NaN.
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_metrics(cfg: CfgNode, results: Mapping, args: argparse.Namespace) -> Path:
    """Write ``OUTPUT_DIR/metrics.json``: {"bbox": {AP, AP50, ...}, "segm": {...}, plus provenance}."""
    out = Path(cfg.OUTPUT_DIR) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **_finite(dict(results)),
        "weights": args.weights,
        "config": str(args.config),
        "data_root": str(args.data_root),
        "max_iter": int(cfg.SOLVER.MAX_ITER),
        "ims_per_batch": int(cfg.SOLVER.IMS_PER_BATCH),
        "world_size": comm.get_world_size(),
        "eval_only": bool(args.eval_only),
        "detectron2": detectron2.__version__,
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    return out


def run(args: argparse.Namespace) -> dict:
    """One process's work (called by ``launch`` on every rank). Returns the evaluation results."""
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    if getattr(args, "syncbn_replaced", None):
        logger.info("SyncBN -> BN (device %s, world size %d): MODEL.%s", cfg.MODEL.DEVICE,
                    args.num_gpus * args.num_machines, ", MODEL.".join(args.syncbn_replaced))
    register_coco(args.data_root)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        StrictBackboneCheckpointer(model, cfg.OUTPUT_DIR, require_all=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        if cfg.MODEL.WEIGHTS and not trainer.start_iter:
            logger.info("loaded %d backbone tensors from %s", len(trainer.checkpointer.loaded_backbone_keys),
                        cfg.MODEL.WEIGHTS)
        trainer.train()
        # DefaultTrainer.train() returns the final evaluation only when EXPECTED_RESULTS is set;
        # the EvalHook after the last iteration always stores it here.
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        path = write_metrics(cfg, results or {}, args)
        logger.info("final metrics written to %s", path)
    return results


def resume_checkpoint(cfg: CfgNode) -> Path | None:
    """The checkpoint ``--resume`` loads: the file ``OUTPUT_DIR/last_checkpoint`` names (Detectron2's rule), or None."""
    tag = Path(cfg.OUTPUT_DIR) / "last_checkpoint"
    if not tag.is_file():
        return None
    return Path(cfg.OUTPUT_DIR) / tag.read_text().strip()


def validate_inputs(args: argparse.Namespace) -> tuple[Path, dict] | None:
    """Read every file the run will load, refuse what is unusable, and check the config against the weights.

    Sets ``args.weights_encoder`` (the weights' encoder record, carried to every rank with ``args``).
    Returns ``(path, record)`` of the file the checkpointer will load (``--weights``, or the resume
    checkpoint), or None when it loads nothing. Raises CheckpointError (an unreadable, code-carrying
    or non-finite file) or ValueError (a config that does not fit).
    """
    loaded = None
    if args.weights != SCRATCH:
        record = read_d2_weights(args.weights)
        args.weights_encoder = encoder_meta(record)
        loaded = (Path(args.weights), record)
    cfg = setup_cfg(argparse.Namespace(**vars(args)))
    resume = resume_checkpoint(cfg) if args.resume else None
    if resume is not None:
        if not resume.is_file():
            raise CheckpointError(f"--resume: {resume} (named in {Path(cfg.OUTPUT_DIR) / 'last_checkpoint'}) not found")
        loaded = (resume, read_d2_weights(resume))
    return loaded


def main(argv: list[str] | None = None) -> int:
    """Entry point: check the inputs, then ``launch`` one process per GPU (or one on CPU)."""
    args = build_parser().parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        print(f"error: config overrides must be KEY VALUE pairs, got {args.opts}", file=sys.stderr)
        return 2
    args.data_root = args.data_root or default_data_root()
    args.config_file = args.config  # default_setup logs and copies the file named here
    problems, loaded = [], None
    if not Path(args.config).is_file():
        problems.append(f"config not found: {args.config}")
    if args.weights != SCRATCH and not Path(args.weights).is_file():
        problems.append(f"weights not found: {args.weights} (convert with tools/convert_to_d2.py, or pass "
                        f"--weights {SCRATCH} for a random-init baseline)")
    try:
        coco_paths(args.data_root)
    except FileNotFoundError as exc:
        problems.append(str(exc))
    if args.num_machines > 1 and args.dist_url == "auto":
        problems.append("--num-machines > 1 needs --dist-url tcp://<machine 0 host>:<port>")
    if args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        problems.append(f"{args.num_gpus} GPUs x {args.num_machines} machines needs CUDA (Detectron2's launch uses "
                        "NCCL); on CPU run one process (--num-gpus 1 --num-machines 1)")
    if not problems:
        try:  # unusable weights and config errors (a bad key, a stem that does not fit) stop here, not in a worker
            loaded = validate_inputs(args)
        except (ValueError, KeyError, AssertionError, CheckpointError) as exc:
            problems.append(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
    if problems:
        for msg in problems:
            print("error: " + " ".join(str(msg).split()), file=sys.stderr)
        return 2
    if loaded is not None and args.num_gpus * args.num_machines == 1:
        _hand_over(*loaded)  # launch() runs the only rank in this process
    launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0
