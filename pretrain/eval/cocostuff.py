"""COCO-Stuff-27 reader for unsupervised semantic segmentation (SlotCon Sec. 4.4, Table 5).

The standard layout (as used by IIC, PiCIE and STEGO)::

    root/images/val2017/000000000139.jpg
    root/annotations/val2017/000000000139.png      stuffthingmaps: value = category id - 1,
                                                   255 = unlabelled
    root/annotations/stuff_val2017.json            COCO-Stuff's stuff categories (ids 92-183)
    root/annotations/instances_val2017.json        COCO's thing categories (ids 1-90)
    root/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt   IIC's curated subset (one id a line)

The 27 coarse classes are *derived* from the ``supercategory`` fields of the category JSONs, not
from a hard-coded table: the 12 thing supercategories (person, vehicle, ..., indoor) followed by
the 15 stuff supercategories (textile, plant, building, ..., solid), each in the order of its
smallest category id. Stuff's catch-all ``other`` (id 183) is unlabelled, as in IIC. The order of
the classes does not change Hungarian-matched scores; it only names the per-class IoUs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .datasets import LabelledImages
from .metrics import IGNORE_INDEX

DEFAULT_FILE_LIST = "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
DEFAULT_CATEGORY_JSONS = ("annotations/instances_val2017.json", "annotations/stuff_val2017.json")
_UNLABELLED_SUPERCATEGORIES = ("other",)


def load_categories(paths: list[Path]) -> list[dict]:
    """Union of the ``categories`` of several COCO-style JSONs (ids must agree where repeated)."""
    cats: dict[int, dict] = {}
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"category annotations {p} not found")
        data = json.loads(p.read_text())
        if "categories" not in data:
            raise KeyError(f"{p} has no 'categories' list")
        for c in data["categories"]:
            for key in ("id", "name", "supercategory"):
                if key not in c:
                    raise KeyError(f"{p}: category {c} lacks '{key}'")
            prev = cats.get(int(c["id"]))
            if prev is not None and (prev["name"], prev["supercategory"]) != (c["name"], c["supercategory"]):
                raise ValueError(f"{p}: category id {c['id']} disagrees with an earlier file")
            cats[int(c["id"])] = c
    return [cats[i] for i in sorted(cats)]


def coarse_classes(categories: list[dict]) -> tuple[list[str], dict[int, int]]:
    """Merge fine categories into coarse ones by supercategory: things first, then stuff.

    A category is a thing if its JSON says ``isthing: 1`` or, failing that field, if its id is at
    most 91 (COCO's thing id range; stuff starts at 92). Returns the coarse class names and a map
    ``fine id -> coarse index``; categories of an unlabelled supercategory (``other``) are left out.
    """
    things: list[str] = []
    stuff: list[str] = []
    for c in sorted(categories, key=lambda c: int(c["id"])):
        sup = str(c["supercategory"])
        if sup in _UNLABELLED_SUPERCATEGORIES:
            continue
        is_thing = bool(c["isthing"]) if "isthing" in c else int(c["id"]) <= 91
        group = things if is_thing else stuff
        if sup not in group:
            group.append(sup)
    clash = set(things) & set(stuff)
    if clash:
        raise ValueError(f"supercategories used by both things and stuff: {sorted(clash)}")
    names = things + stuff
    index = {n: i for i, n in enumerate(names)}
    fine_to_coarse = {int(c["id"]): index[c["supercategory"]] for c in categories
                      if c["supercategory"] in index}
    return names, fine_to_coarse


def label_table(fine_to_coarse: dict[int, int], value_offset: int = 1) -> np.ndarray:
    """Lookup table PNG value -> coarse class (``IGNORE_INDEX`` for unlabelled / unknown ids).

    ``value_offset``: category id = PNG value + offset (1 for the stuffthingmaps PNGs).
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for fine, coarse in fine_to_coarse.items():
        v = fine - value_offset
        if 0 <= v < 255:
            table[v] = coarse
    return table


def read_file_list(path: Path) -> list[str]:
    """Image stems from a file list: one per line, bare id or file name, blank lines skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"file list {path} not found")
    stems = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            stems.append(Path(line).stem)
    if not stems:
        raise ValueError(f"file list {path} is empty")
    return stems


class CocoStuff27(LabelledImages):
    """COCO-Stuff val images of a curated list with the 27 coarse labels (12 things + 15 stuff)."""

    def __init__(self, root: str | Path, split: str = "val2017", resolution: int | None = 320,
                 file_list: str | Path | None = DEFAULT_FILE_LIST,
                 category_jsons: list[str | Path] | None = None,
                 label_dir: str | Path | None = None, value_offset: int = 1,
                 expect_classes: int | None = 27) -> None:
        root = Path(root)
        jsons = [root / p for p in (category_jsons or DEFAULT_CATEGORY_JSONS)]
        names, fine_to_coarse = coarse_classes(load_categories(jsons))
        if expect_classes is not None and len(names) != expect_classes:
            raise ValueError(f"supercategories in {[str(j) for j in jsons]} give {len(names)} coarse "
                             f"classes, expected {expect_classes}: {names}")
        img_dir = root / "images" / split
        lab_dir = root / (label_dir if label_dir is not None else Path("annotations") / split)
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} not found (COCO-Stuff layout: images/{split}, annotations/{split})")
        if file_list is not None:
            stems = read_file_list(root / file_list)
        else:
            stems = sorted(p.stem for p in img_dir.glob("*.jpg"))
        images = [img_dir / f"{s}.jpg" for s in stems]
        labels = [lab_dir / f"{s}.png" for s in stems]
        missing = [str(p) for p in images + labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files of the list are missing, e.g. {missing[0]}")
        self.fine_to_coarse = fine_to_coarse
        super().__init__(images, labels, resolution, names, label_table(fine_to_coarse, value_offset))
