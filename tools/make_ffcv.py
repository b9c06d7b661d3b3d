"""Write a pretraining dataset to an FFCV ``.beton`` (for ``data.loader=ffcv``).

    python tools/make_ffcv.py --dataset coco --root /datasets/coco out/coco_train.beton \
        --max-resolution 512 --jpeg-quality 90 --workers 16

The file is written under a temporary name and renamed when complete; undecodable images are
replaced by the next decodable one (as on the PIL path) and counted, and more of them than
``--max-bad-fraction`` is an error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data.datasets import dataset_files  # noqa: E402
from pretrain.data.ffcv_writer import write_beton  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output .beton path")
    p.add_argument("--dataset", default="toy", choices=["toy", "coco", "cocoplus", "imagenet", "folder"])
    p.add_argument("--root", required=True, help="dataset root (layout as for data.dataset)")
    p.add_argument("--max-resolution", type=int, default=512, help="cap on the longest side; 0 keeps sizes")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "smart"])
    p.add_argument("--workers", type=int, default=2, help="encoding processes")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    a = p.parse_args(argv)
    files = dataset_files(a.dataset, a.root)
    t0 = time.time()
    stats = write_beton(files, a.out, max_resolution=a.max_resolution or None, jpeg_quality=a.jpeg_quality,
                        write_mode=a.write_mode, num_workers=a.workers, max_bad_fraction=a.max_bad_fraction)
    print(f"wrote {a.out}: {stats['images']} images ({stats['bad']} undecodable, replaced) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
