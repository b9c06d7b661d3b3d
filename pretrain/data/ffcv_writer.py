"""Write a dataset to an FFCV ``.beton`` for the FFCV loader path.

Fields: ``image`` (RGB, JPEG or raw, longest side capped at ``max_resolution``), ``index`` (the
dataset index of the stored image) and ``skipped`` (undecodable files that were replaced by it,
0 almost always). Position ``k`` in the file holds the sample requested as index ``k``: an
undecodable file is replaced by the next decodable one exactly as on the PIL path, so both paths
see the same samples and report the same ``skipped`` counts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .datasets import BadImageError, load_valid

BETON_FIELDS = ("image", "index", "skipped")


class _Source:
    """Indexable ``(image, index, skipped)`` view of a file list for ``DatasetWriter``."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int):
        img, used, skipped = load_valid(self.files, k)
        return img, used, skipped


def write_beton(files: list[Path], path: str | os.PathLike, *, max_resolution: int | None = 512,
                jpeg_quality: int = 90, write_mode: str = "jpg", num_workers: int = 2,
                max_bad_fraction: float = 0.01) -> dict[str, int]:
    """Write ``files`` to ``path`` (through a temporary name, renamed when complete).

    Returns ``{"images": n, "bad": undecodable files}``. More undecodable files than
    ``max_bad_fraction`` of the dataset is an error and leaves no ``.beton`` behind.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        writer = DatasetWriter(str(tmp), {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            "index": IntField(),
            "skipped": IntField(),
        }, num_workers=num_workers)
        writer.from_indexed_dataset(_Source(files), chunksize=64)
        meta = Reader(str(tmp)).metadata
        skipped = np.asarray(meta["f2"])
        used = np.asarray(meta["f1"])
        n = len(files)
        bad = {int(u - d) % n for u, s in zip(used, skipped) for d in range(1, int(s) + 1)}
        if len(bad) > max_bad_fraction * n:
            examples = ", ".join(str(files[i]) for i in sorted(bad)[:5])
            raise BadImageError(f"{len(bad)} of {n} images are undecodable (over max_bad_fraction="
                                f"{max_bad_fraction}); e.g. {examples}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"images": n, "bad": len(bad)}
