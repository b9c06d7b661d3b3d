"""Convert a pretraining checkpoint's teacher encoder to MMSegmentation's ResNet format.

    python tools/convert_to_mmseg.py CKPT OUT.pth [--arch resnet50]

CKPT is a full pretraining checkpoint (teacher encoder under ``teacher_encoder.``), a run directory,
an exported backbone ``{"backbone": ..., "arch": ...}`` (docs/contracts.md), an official SlotCon
release checkpoint (its teacher ``encoder_k``, never the student ``encoder_q``) or a plain
torchvision ResNet state dict (``fc`` dropped). The teacher encoder is what SlotCon
transfers (Sec. 4.2). OUT holds plain tensors under ``state_dict`` with mmseg ``type='ResNet'`` key
names (no prefix: consumed by the backbone's ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``,
which ``python -m transfer.segmentation --weights OUT`` sets); see transfer/segmentation/weights.py.
Every key of mmseg's ResNet of that depth is verified present once with the right shape, and
nothing else; unreadable files (including a pickle that would run code: the input is read with
``torch.load(weights_only=True)``), checkpoints without an encoder, a wrong depth and non-finite
values are refused with exit status 2 and one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer.checkpoint_io import CheckpointError, refuse  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining checkpoint, run dir, exported backbone, official SlotCon "
                   "checkpoint or torchvision ResNet state dict")
    p.add_argument("output", help="output .pth for MMSegmentation")
    p.add_argument("--arch", help="required depth, e.g. resnet50 (default: the checkpoint's)")
    args = p.parse_args(argv)

    from transfer.segmentation.weights import convert

    try:
        s = convert(args.checkpoint, args.output, args.arch)
    except CheckpointError as exc:
        return refuse(exc, "convert_to_mmseg: ")
    print(f"input      {s['source']}")
    print(f"arch       {s['arch']} (teacher encoder)")
    print(f"tensors    {s['tensors']} (every key of mmseg ResNet-{s['depth']}, verified; no fc, no extras)")
    print(f"parameters {s['parameters']:,}")
    print(f"checksum   {s['checksum']}")
    print(f"encoder    {s['encoder'] or 'not recorded'}"
          + (" (no stem max-pool: transfer.segmentation builds ResNetStemVariant)" if s["encoder"].get("stem_pool") is False else ""))
    print(f"output     {s['output']}")
    print(f"use        python -m transfer.segmentation --config configs/segmentation/<cfg>.py --weights {s['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
