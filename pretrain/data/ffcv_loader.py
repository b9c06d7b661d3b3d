"""FFCV two-view loader: the same batches as the PIL path (docs/contracts.md), from a ``.beton``.

How it works (DESIGN.md, FFCV facts):

- :class:`TwoViewCropDecoder` subclasses FFCV's ``RandomResizedCropRGBImageDecoder``. It decodes
  each JPEG **once** and cuts both views from it, drawing the crop pair with the same jitted
  sampler as the PIL path (pretrain/data/crops.py, overlap rule included), seeded by
  ``(seed, epoch, index)``. Besides the ``(B, 2, S, S, 3)`` crops it writes the pair
  ``[i1, j1, h1, w1, flip1, i2, j2, h2, w2, flip2]`` of each sample into an extra
  ``AllocationQuery`` and returns ``(crops, pairs)``; two tiny jitted ops split that tuple, the
  pair branch hanging off the same decoder through ``PipelineSpec(source=decoder)``. Decoding
  once instead of running one decoder per view halves the JPEG work, the dominant cost.
- The epoch reaches the jitted decoder through a small array read by address (numba freezes
  captured arrays at compile time), so nothing is recompiled per epoch.
- Flips, the BYOL photometric augmentations and normalisation: on a GPU batch-wise with torch
  on the device (pretrain/data/photometric.py); on the CPU per image with OpenCV on a few
  threads (pretrain/data/photometric_cpu.py, as the PIL path), written into the batch tensors.
  Both implementations take the same per-sample parameters and agree to float precision.
- Order: this project's :class:`~pretrain.data.loader_base.EpochOrder` (DistributedSampler
  semantics, ``iter_from``) replaces FFCV's traversal order; order, resume and bad-image
  accounting are the PIL path's (``loader_base.py``).

FFCV's ``num_workers`` are numba threads; the first epoch compiles. FFCV resizes with OpenCV's
INTER_AREA (its C++ resize has no other mode), not bicubic as the PIL path does.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
from ffcv.fields.basics import IntDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import DataConfig
from .device_copy import upload
from .crops import HFLIP, N_PAIR, VFLIP, intersection_boxes, sample_crop_pair, sample_key
from .loader_base import EpochCursor, LoaderBase
from .two_view import RATIO, finish_views, finish_views_cpu


@intrinsic
def _as_voidptr(typingctx, addr):
    """int64 address -> void* (to read a live numpy array from jitted code)."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


class TwoViewCropDecoder(RandomResizedCropRGBImageDecoder):
    """Decodes once, returns ``(crops (B,2,S,S,3) uint8, pairs (B,10) int64)``."""

    def __init__(self, cfg: DataConfig, seed: int):
        s = cfg.image_size
        super().__init__((s, s), scale=(cfg.min_scale, cfg.max_scale), ratio=RATIO)
        self.min_overlap, self.flip_p, self.seed = float(cfg.min_overlap), float(cfg.flip_p), int(seed)
        self.vflip_p = float(cfg.vflip_p)
        self.epoch_state = np.zeros(1, dtype=np.int64)  # read by address from the jitted decoder

    def set_epoch(self, epoch: int) -> None:
        self.epoch_state[0] = epoch

    def declare_state_and_memory(self, previous_state: State):
        widths, heights = self.metadata["width"], self.metadata["height"]
        self.max_width, self.max_height = np.uint64(widths.max()), np.uint64(heights.max())
        s0, s1 = self.output_size
        crops = (2, s0, s1, 3)
        u1 = np.dtype("<u1")
        return (
            replace(previous_state, jit_mode=True, shape=crops, dtype=u1),
            (AllocationQuery(crops, u1),
             AllocationQuery((self.max_height * self.max_width * np.uint64(3),), u1),
             AllocationQuery((N_PAIR,), np.dtype("<i8"))),
        )

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        pair_c = sample_crop_pair  # already jitted (shared with the PIL path)
        key_c = sample_key
        s0, s1 = float(self.scale[0]), float(self.scale[1])
        r0, r1 = float(self.ratio[0]), float(self.ratio[1])
        min_overlap, flip_p, vflip_p, seed = self.min_overlap, self.flip_p, self.vflip_p, self.seed
        epoch_addr = self.epoch_state.ctypes.data

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, pairs = my_storage
            epoch = numba.carray(_as_voidptr(epoch_addr), (1,), np.int64)[0]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                p = pairs[dst_ix]
                pair_c(key_c(seed, epoch, np.int64(source_ix), 0), np.int64(height), np.int64(width),
                       s0, s1, r0, r1, min_overlap, flip_p, vflip_p, p)
                resize_crop_c(temp_buffer, p[0], p[0] + p[2], p[1], p[1] + p[3], destination[dst_ix, 0])
                resize_crop_c(temp_buffer, p[5], p[5] + p[7], p[6], p[6] + p[8], destination[dst_ix, 1])
            n = len(batch_indices)
            return destination[:n], pairs[:n]

        decode.is_parallel = True
        return decode


class _Take(Operation):
    """Jitted op selecting element ``k`` of the decoder's ``(crops, pairs)`` tuple."""

    def __init__(self, k: int, shape: tuple[int, ...], dtype: np.dtype):
        super().__init__()
        self.k, self.shape, self.dtype = k, shape, dtype

    def declare_state_and_memory(self, previous_state: State):
        return replace(previous_state, jit_mode=True, shape=self.shape, dtype=self.dtype), None

    def generate_code(self):
        k = self.k

        def take(inp, _dst):
            return inp[k]

        return take


class _Order(EpochCursor):
    """Stands in for FFCV's traversal order: this rank's indices for one epoch, from a step."""

    def sample_order(self, _ffcv_epoch: int) -> np.ndarray:
        flat = [i for b in self.batches() for i in b]
        return np.asarray(flat, dtype=np.uint64)


class FFCVPretrainLoader(LoaderBase):
    """FFCV two-view loader with the interface of :class:`~pretrain.data.loader_base.LoaderBase`
    (as the PIL path's ``PretrainLoader``); batches are on ``device``."""

    def __init__(self, cfg: DataConfig, batch_size: int, *, rank: int, world_size: int, seed: int,
                 device: torch.device, drop_last: bool = True):
        path = Path(cfg.ffcv_path)
        if not cfg.ffcv_path or not path.is_file():
            raise FileNotFoundError(f"data.ffcv_path={cfg.ffcv_path!r} is not a file: write one with "
                                    f"`python tools/make_ffcv.py --dataset {cfg.dataset} --root {cfg.root} OUT.beton`")
        self.cfg, self.seed, self.device = cfg, int(seed), torch.device(device)
        self.decoder = TwoViewCropDecoder(cfg, seed)
        s = cfg.image_size
        crops_op = _Take(0, (2, s, s, 3), np.dtype("<u1"))
        pairs_op = _Take(1, (N_PAIR,), np.dtype("<i8"))
        self.loader = Loader(
            str(path), batch_size=batch_size, num_workers=max(1, int(cfg.num_workers)),
            order=OrderOption.SEQUENTIAL, drop_last=drop_last, os_cache=True, batches_ahead=3,
            pipelines={
                "image": PipelineSpec("image", decoder=self.decoder, transforms=[crops_op]),
                "pairs": PipelineSpec(self.decoder, transforms=[pairs_op]),
                "index": [IntDecoder()],
                "skipped": [IntDecoder()],
            },
        )
        # FFCV's header holds the count as numpy uint64: index arithmetic with it cannot go below 0
        n = int(self.loader.reader.num_samples)
        self.num_images = n
        super().__init__(n, batch_size, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last,
                         max_bad_fraction=cfg.max_bad_fraction, name=lambda i: f"{path} sample {i}")
        self.traversal = _Order(self.order)
        self.loader.traversal_order = self.traversal
        self._outputs = list(self.loader.pipeline_specs)  # FFCV's output order
        self._live = None
        # Augmentation threads exist only on the CPU (on a GPU the batch is augmented on the device).
        nthreads = max(1, int(cfg.num_workers)) if self.device.type == "cpu" else 1
        self._pool = ThreadPoolExecutor(nthreads, thread_name_prefix="ffcv-aug") if nthreads > 1 else None
        if self.device.type == "cpu":
            # the augmentation threads already split the batch over the cores; OpenCV's own
            # threads inside each call would oversubscribe them
            cv2.setNumThreads(1)

    def _stop_live(self) -> None:
        """Stop an abandoned epoch's decoding thread before the next one starts (both would
        drive the same numba thread pool and read the same epoch cell)."""
        it, self._live = self._live, None
        if it is None:
            return
        it.close()
        while it.is_alive():
            try:
                it.output_queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def _views_cpu(self, raw: np.ndarray, flips: np.ndarray, requested: list[int]) -> list[torch.Tensor]:
        """Both views on the CPU: OpenCV per image (photometric_cpu.py), chunks of the batch on the
        augmentation threads (OpenCV releases the GIL), written straight into the batch tensors."""
        bsz, s = raw.shape[0], raw.shape[2]
        views = [torch.empty((bsz, 3, s, s)) for _ in (0, 1)]
        k = self._pool._max_workers if self._pool is not None else 1
        bounds = np.linspace(0, bsz, k + 1).astype(int)
        jobs = [(raw[a:b, v], flips[a:b, v], self.cfg, self.seed, self.epoch, requested[a:b], v, views[v].numpy()[a:b])
                for v in (0, 1) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if self._pool is None:
            for job in jobs:
                finish_views_cpu(*job)
        else:
            for f in [self._pool.submit(finish_views_cpu, *job) for job in jobs]:
                f.result()
        return views

    def _views_device(self, raw: np.ndarray, flips: np.ndarray, requested: list[int]) -> list[torch.Tensor]:
        """Both views on an accelerator: uint8 crops to the device, flips and photometric
        augmentations batched there (photometric.py)."""
        dev = self.device
        # upload() copies out of FFCV's buffer before returning: FFCV may refill it for a later batch
        # while this one is still on its way to the device.
        x = upload(torch.from_numpy(raw), dev).permute(0, 1, 4, 2, 3)  # (B,2,3,S,S)
        views = []
        for v in (0, 1):
            f = upload(torch.from_numpy(np.ascontiguousarray(flips[:, v])), dev).view(-1, 1, 1, 1)
            xv = torch.where((f & HFLIP) > 0, x[:, v].flip(-1), x[:, v])
            xv = torch.where((f & VFLIP) > 0, xv.flip(-2), xv).contiguous()
            views.append(finish_views(xv, self.cfg, self.seed, self.epoch, requested, v))
        return views

    def _batch(self, crops, pairs, index, skipped) -> dict[str, torch.Tensor]:
        dev = self.device
        index = torch.from_numpy(np.asarray(index).reshape(-1).copy())
        skipped = torch.from_numpy(np.asarray(skipped).reshape(-1).copy())
        self.tracker.update(index, skipped)  # on the host copies: reading the uploaded ones back would sync
        pairs = np.asarray(pairs).copy()
        requested = ((index - skipped) % self.num_images).tolist()
        raw = np.asarray(crops)  # (B,2,S,S,3) uint8, FFCV's buffer: consumed before the next batch
        flips = pairs[:, [4, 9]].astype(np.uint8)  # codes: bit 0 horizontal, bit 1 vertical (crops.py)
        views = (self._views_cpu if dev.type == "cpu" else self._views_device)(raw, flips, requested)
        flips = torch.from_numpy(flips)
        b1, b2 = intersection_boxes(pairs)
        return {
            "view1": views[0], "view2": views[1],
            "box1": upload(torch.from_numpy(b1), dev), "box2": upload(torch.from_numpy(b2), dev),
            "flip1": upload(flips[:, 0].contiguous(), dev), "flip2": upload(flips[:, 1].contiguous(), dev),
            "skipped": upload(skipped, dev), "index": upload(index, dev),
        }

    def iter_from(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate the current epoch from batch ``step`` on (exact resume inside an epoch)."""
        self._stop_live()
        self.decoder.set_epoch(self.epoch)
        self.traversal.seek(self.epoch, step)
        it = iter(self.loader)
        self._live = it
        try:
            for result in it:
                r = dict(zip(self._outputs, result))
                batch = self._batch(r["image"], r["pairs"], r["index"], r["skipped"])
                yield batch
        finally:
            if self._live is it:
                self._stop_live()

    def close(self) -> None:
        """Stop the decoding thread and the augmentation threads."""
        self._stop_live()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
