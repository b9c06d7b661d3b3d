"""Stack check: each non-transfer dependency exercised for real on the CPU.

Detectron2 and MMSegmentation have their own stack checks (test_detectron2_stack.py, test_mmseg_stack.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def _write_jpegs(folder: Path, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
        # Smooth content so JPEG round-trips close to the source.
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), np.full((h, w), 40 * i % 255)], -1).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=95)
        arrays.append(img)
    return arrays


def test_ffcv_write_and_read(tmp_path: Path) -> None:
    """Write a .beton with FFCV's DatasetWriter and read every image back through its Loader."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.writer import DatasetWriter
    from PIL import Image

    rng = np.random.default_rng(0)
    src = _write_jpegs(tmp_path / "img", 6, rng)
    # Same-size images so the simple decoder can batch them.
    src = [np.asarray(Image.fromarray(a).resize((48, 48))) for a in src]

    class DS(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(src)

        def __getitem__(self, i: int):
            return src[i], i

    path = str(tmp_path / "ds.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1).from_indexed_dataset(DS())
    loader = Loader(path, batch_size=3, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    seen = []
    for images, labels in loader:
        for img, lab in zip(images, labels):
            np.testing.assert_array_equal(np.asarray(img), src[int(lab.reshape(-1)[0])])
            seen.append(int(lab.reshape(-1)[0]))
    assert sorted(seen) == list(range(6))


def _allreduce_task() -> list[float]:
    import submitit
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export()
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    t = torch.tensor([float(env.rank + 1), 10.0 * (env.rank + 1)])
    dist.all_reduce(t)
    dist.destroy_process_group()
    return [float(env.rank), float(env.world_size)] + t.tolist()


def test_submitit_local_two_tasks_allreduce(tmp_path: Path) -> None:
    """A submitit job on the local executor with two tasks that all-reduce a tensor over gloo."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(tmp_path / "jobs"), cluster="local")
    ex.update_parameters(tasks_per_node=2, nodes=1, timeout_min=5)
    job = ex.submit(_allreduce_task)
    results = sorted(job.results())
    assert [r[:2] for r in results] == [[0.0, 2.0], [1.0, 2.0]]
    for r in results:
        assert r[2:] == [3.0, 30.0]  # (1 + 2), (10 + 20)


def test_tensorboard_event_file_roundtrip(tmp_path: Path) -> None:
    """Scalars and an image written with torch's SummaryWriter are read back by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for step in range(5):
        w.add_scalar("loss/total", 1.0 / (step + 1), step)
    w.add_image("slots", torch.rand(3, 8, 8), 4)
    w.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0}).Reload()
    vals = [(e.step, e.value) for e in acc.Scalars("loss/total")]
    assert [s for s, _ in vals] == list(range(5))
    np.testing.assert_allclose([v for _, v in vals], [1.0 / (s + 1) for s in range(5)], rtol=1e-6)
    assert acc.Images("slots")[0].width == 8


def test_pycocotools_rle_roundtrip() -> None:
    """pycocotools' compiled mask codec encodes and decodes a mask exactly."""
    from pycocotools import mask as mask_util

    m = np.zeros((20, 30), dtype=np.uint8, order="F")
    m[3:9, 4:17] = 1
    rle = mask_util.encode(m)
    assert mask_util.area(rle) == 6 * 13
    np.testing.assert_array_equal(mask_util.decode(rle), m)
