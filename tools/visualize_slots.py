"""Overlay a checkpoint's slot/prototype assignments on images: one PNG per image.

    python tools/visualize_slots.py CKPT IMAGE [IMAGE ...] --out slots_viz [--size 320]

CKPT is a full training checkpoint, a run directory (newest checkpoint) or an official SlotCon
release checkpoint (its teacher, see transfer/official_slotcon.py); one that cannot be used is
refused with one line on stderr and exit status 2. Each output
``<out>/<stem>_slots.png`` shows the image and, beside it, every pixel coloured by its argmax
prototype (teacher ``assign``, bilinearly upsampled) with group boundaries in white.
``--random-init`` shows the same network untrained.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.eval.datasets import load_rgb, resize_crop  # noqa: E402
from pretrain.eval.inference import assign_batch, default_device, load_method  # noqa: E402
from pretrain.eval.visualize import denormalize, overlay_assignments, save_png  # noqa: E402
from transfer.checkpoint_io import CheckpointError, refuse  # noqa: E402


def visualize(checkpoint: str | Path, images: list[str | Path], out: str | Path, size: int | None = 320,
              device: torch.device | None = None, random_init: bool = False, alpha: float = 0.5,
              side_by_side: bool = True) -> list[Path]:
    """Write ``<out>/<stem>_slots.png`` for every image; returns the paths written."""
    device = device or default_device()
    method, _ = load_method(checkpoint, device, random_init=random_init)
    out = Path(out)
    written = []
    from tqdm import tqdm

    for path in tqdm(images, desc="slots", disable=len(images) < 8):
        path = Path(path)
        img, _ = resize_crop(load_rgb(path), None, size)
        x = img[None]
        vis = overlay_assignments(x.to(device), assign_batch(method, x, device), alpha=alpha)[0].cpu()
        if side_by_side:
            vis = torch.cat([denormalize(x)[0], torch.ones(3, vis.shape[1], 4), vis], dim=2)
        written.append(save_png(vis, out / f"{path.stem}_slots.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    """The command: 0 on success, 2 with ``refused: <reason>`` on stderr for a checkpoint it cannot use."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default="slots_viz")
    p.add_argument("--size", type=int, default=320, help="shorter side + centre crop; 0 = native size")
    p.add_argument("--device", default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--overlay-only", action="store_true", help="omit the plain image on the left")
    p.add_argument("--random-init", action="store_true")
    a = p.parse_args(argv)
    missing = [i for i in a.images if not Path(i).is_file()]
    if missing:
        p.error(f"image(s) not found: {missing}")
    try:
        paths = visualize(a.checkpoint, a.images, a.out, a.size or None,
                          torch.device(a.device) if a.device else None, a.random_init, a.alpha, not a.overlay_only)
    except CheckpointError as exc:
        return refuse(exc)
    print(f"wrote {len(paths)} picture(s) to {a.out}")
    return 0


if __name__ == "__main__":
    rc = main()
    if rc:  # exit only on failure, so a clean run leaves an in-process caller (runpy) running
        sys.exit(rc)
