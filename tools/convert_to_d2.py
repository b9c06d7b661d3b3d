#!/usr/bin/env python
"""Convert the teacher encoder of a pretraining checkpoint to Detectron2 weights.

    python tools/convert_to_d2.py CKPT OUT.pkl [--depth 50]

CKPT is a full pretraining checkpoint (teacher encoder under ``teacher_encoder.``), a run directory,
an exported backbone ``{"backbone": ..., "arch": ...}``, an official SlotCon release checkpoint
(e.g. ``slotcon_coco_r50_800ep.pth``: its teacher ``encoder_k``, never the student ``encoder_q``) or a
plain torchvision ResNet state dict (``fc`` dropped). Every backbone key of the depth is verified
against Detectron2's own ResNet, and every value must be finite. The input is read with
``torch.load(weights_only=True)``: a pickle that would run code is refused. Exit status 0 on success,
2 with a one-line reason on refusal.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer.checkpoint_io import RESNET_LAYOUT, CheckpointError, load_teacher_encoder_with_variant, refuse
from transfer.detection.convert import summary, to_detectron2, write_d2_pickle

DEPTHS = sorted(int(a[len("resnet"):]) for a in RESNET_LAYOUT)


def convert(ckpt: str | Path, out: str | Path, depth: int | None = None) -> str:
    """Convert ``ckpt`` to ``out``; return the summary. Raises CheckpointError on refusal."""
    arch = None if depth is None else f"resnet{depth}"
    state, arch, variant = load_teacher_encoder_with_variant(ckpt, arch)
    arrays = to_detectron2(state, arch)
    write_d2_pickle(arrays, out, encoder=variant)
    return summary(ckpt, out, arch, arrays) + f"\nencoder    : {variant or 'not recorded'}" + (
        "\n             (no stem max-pool: fine-tune with MODEL.RESNETS.STEM_POOL False, "
        "e.g. configs/detection/mask_rcnn_R18_FPN_toy_scenes_demo.yaml)" if variant.get("stem_pool") is False else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="pretraining checkpoint, run dir, exported backbone, official SlotCon "
                   "checkpoint or torchvision ResNet state dict (.pth)")
    p.add_argument("out", help="output Detectron2 weights (.pkl)")
    p.add_argument("--depth", type=int, choices=DEPTHS, default=None,
                   help="required ResNet depth (default: inferred from the checkpoint; a mismatch is refused)")
    args = p.parse_args(argv)
    if Path(args.out).suffix != ".pkl":
        print(f"refused: output {args.out} must end in .pkl (Detectron2 reads pickled numpy weights by suffix)",
              file=sys.stderr)
        return 2
    try:
        print(convert(args.ckpt, args.out, args.depth))
    except CheckpointError as exc:
        return refuse(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
