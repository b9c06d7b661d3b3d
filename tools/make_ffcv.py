"""Write a pretraining dataset to an FFCV ``.beton`` (for ``data.loader=ffcv``).

    python tools/make_ffcv.py --dataset coco --root /datasets/coco out/coco_train.beton \
        --max-resolution 512 --jpeg-quality 90 --workers 16

The file is written under a temporary name and renamed when complete. Images are stored upright
(EXIF orientation applied). Bad images (undecodable, decompression bombs over
``--max-image-pixels``, or not storable: an aspect ratio so extreme that a side would shrink to 0
pixels at ``--max-resolution``) are replaced by the next good one (as on the PIL path), counted
and named in the summary; more of them than ``--max-bad-fraction`` is an error (exit 1). A writer
worker that dies, or no progress for ``--stall-timeout`` seconds, ends the tool with exit 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pretrain.data.datasets import BadImageError, dataset_files  # noqa: E402
from pretrain.data.ffcv_writer import WriterError, write_beton  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Write the ``.beton``; print a summary (with the skipped files), or exit 1 with the reason."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output .beton path")
    p.add_argument("--dataset", default="toy", choices=["toy", "coco", "cocoplus", "imagenet", "folder"])
    p.add_argument("--root", required=True, help="dataset root (layout as for data.dataset)")
    p.add_argument("--max-resolution", type=int, default=512, help="cap on the longest side; 0 keeps sizes")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart"])
    p.add_argument("--workers", type=int, default=2, help="encoding processes")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--max-image-pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                   help="larger images are skipped as decompression bombs (PIL's limit by default; 0: no limit)")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="seconds without progress after which the writer is stopped as stuck")
    a = p.parse_args(argv)
    # the writer's worker processes are forked from this one and inherit the limit
    Image.MAX_IMAGE_PIXELS = a.max_image_pixels if a.max_image_pixels > 0 else None
    files = dataset_files(a.dataset, a.root)
    t0 = time.time()
    try:
        stats = write_beton(files, a.out, max_resolution=a.max_resolution or None, jpeg_quality=a.jpeg_quality,
                            write_mode=a.write_mode, num_workers=a.workers, max_bad_fraction=a.max_bad_fraction,
                            stall_timeout=a.stall_timeout)
    except (BadImageError, WriterError) as e:
        sys.exit(f"make_ffcv: {a.out} not written: {e}")
    print(f"wrote {a.out}: {stats['images']} images ({stats['bad']} bad, each replaced by the next good one) "
          f"in {time.time() - t0:.1f}s")
    if stats["bad"]:
        more = stats["bad"] - len(stats["examples"])
        print("skipped:\n  " + "\n  ".join(stats["examples"]) + (f"\n  ... and {more} more" if more else ""))


if __name__ == "__main__":
    main()
