"""Write the toy-scenes dataset (COCO layout plus semantic/instance PNGs; see docs/contracts.md).

    python tools/make_toy_scenes.py data/toy_scenes --n-train 256 --n-val 64 --size 128 --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data.toy_scenes import load_meta, make_toy_scenes  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output folder")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = make_toy_scenes(a.root, a.n_train, a.n_val, size=a.size, seed=a.seed)
    meta = load_meta(root)
    print(f"toy scenes at {root}: {meta['n_train']} train / {meta['n_val']} val, size {meta['size']}, "
          f"classes {meta['classes']}")


if __name__ == "__main__":
    main()
