"""COCO-Stuff-27 reader on a fake layout: the 27-class merge comes from the JSON supercategories."""
import json

import numpy as np
import pytest
from PIL import Image

from pretrain.eval.cocostuff import CocoStuff27, coarse_classes, load_categories

# (id, name, supercategory): one or two fine classes per supercategory, COCO's real ids.
THINGS = [(1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
          (10, "traffic light", "outdoor"), (16, "bird", "animal"), (17, "cat", "animal"),
          (27, "backpack", "accessory"), (34, "frisbee", "sports"), (44, "bottle", "kitchen"),
          (52, "banana", "food"), (62, "chair", "furniture"), (72, "tv", "electronic"),
          (78, "microwave", "appliance"), (84, "book", "indoor")]
STUFF = [(92, "banner", "textile"), (93, "blanket", "textile"), (94, "branch", "plant"),
         (95, "bridge", "building"), (98, "cabinet", "furniture-stuff"), (99, "cage", "structural"),
         (100, "cardboard", "raw-material"), (101, "carpet", "floor"), (102, "ceiling-other", "ceiling"),
         (106, "clouds", "sky"), (122, "fruit", "food-stuff"), (125, "gravel", "ground"),
         (149, "rock", "solid"), (171, "wall-brick", "wall"), (178, "water-other", "water"),
         (180, "window-blind", "window"), (183, "other", "other")]
EXPECTED = ["person", "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen", "food", "furniture",
            "electronic", "appliance", "indoor", "textile", "plant", "building", "furniture-stuff",
            "structural", "raw-material", "floor", "ceiling", "sky", "food-stuff", "ground", "solid", "wall",
            "water", "window"]


def _fake_layout(root, stems, listed):
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations" / "val2017").mkdir(parents=True)
    (root / "curated" / "val2017").mkdir(parents=True)
    # COCO's instances JSON has no isthing field; the stuff JSON carries it on some releases only.
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(
        {"categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in THINGS]}))
    # the stuff JSON shuffled: the order must come from ids, not from the file
    stuff = [{"id": i, "name": n, "supercategory": s} for i, n, s in STUFF][::-1]
    (root / "annotations" / "stuff_val2017.json").write_text(json.dumps({"categories": stuff}))
    rng = np.random.default_rng(0)
    for s in stems:
        Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(root / "images" / "val2017" / f"{s}.jpg")
    # stuffthingmaps: value = id - 1; 255 unlabelled
    row = [0, 1, 2, 92, 182, 255, 4, 170]  # person, bicycle, car, blanket, other, unlabelled, id 5 (unknown), wall-brick
    lab = np.array([row] * 6, dtype=np.uint8)
    for s in stems:
        Image.fromarray(lab).save(root / "annotations" / "val2017" / f"{s}.png")
    (root / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text(
        "\n".join(listed) + "\n\n")


def test_coarse_classes_from_supercategories(tmp_path):
    _fake_layout(tmp_path, ["000000000139"], ["000000000139"])
    cats = load_categories([tmp_path / "annotations" / "instances_val2017.json",
                            tmp_path / "annotations" / "stuff_val2017.json"])
    names, f2c = coarse_classes(cats)
    assert names == EXPECTED and len(names) == 27 and names.index("wall") == 24
    assert f2c[2] == f2c[3] == 1 and f2c[92] == f2c[93] == 12 and 183 not in f2c


def test_reader_labels_and_file_list(tmp_path):
    stems = ["000000000139", "000000000285", "000000000632"]
    _fake_layout(tmp_path, stems, ["000000000632", "000000000139.jpg"])
    ds = CocoStuff27(tmp_path, resolution=None)
    assert len(ds) == 2 and ds.num_classes == 27
    assert [p.stem for p in ds.images] == ["000000000632", "000000000139"]
    item = ds[0]
    assert item["image"].shape == (3, 6, 8)
    assert item["label"][0].tolist() == [0, 1, 1, 12, 255, 255, 255, 24]
    # at 4 px (shorter side 6 -> 4, centre crop): nearest-neighbour labels, no new values
    small = CocoStuff27(tmp_path, resolution=4)[1]["label"]
    assert small.shape == (4, 4) and set(small.unique().tolist()) <= {0, 1, 12, 24, 255}


def test_reader_errors_name_the_problem(tmp_path):
    _fake_layout(tmp_path, ["000000000139"], ["000000000139", "000000000999"])
    with pytest.raises(FileNotFoundError, match="000000000999"):
        CocoStuff27(tmp_path, resolution=None)
    with pytest.raises(ValueError, match="expected 28"):
        CocoStuff27(tmp_path, resolution=None, file_list=None, expect_classes=28)
