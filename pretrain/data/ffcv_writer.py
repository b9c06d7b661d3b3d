"""Write a dataset to an FFCV ``.beton`` for the FFCV loader path.

Fields: ``image`` (upright RGB, EXIF orientation applied, JPEG or raw, longest side capped at
``max_resolution``), ``index`` (the dataset index of the stored image) and ``skipped`` (bad files
that were replaced by it, 0 almost always). Position ``k`` in the file holds the sample requested
as index ``k``: a bad file is replaced by the next good one exactly as on the PIL path, so both
paths see the same samples and report the same ``skipped`` counts.

A file is bad if it cannot be decoded (:func:`~pretrain.data.datasets.decode_rgb`: corrupt,
truncated, a decompression bomb) or cannot be stored: an aspect ratio so extreme that the short
side would shrink to 0 pixels at ``max_resolution``, a side over FFCV's 65535, or more bytes than
an FFCV page. These checks run in the writer's worker processes before FFCV sees the image, so
no worker dies on one. A worker that dies anyway (killed, out of memory, a crash in a decoder)
or stops making progress ends the write with :class:`WriterError` instead of FFCV's endless wait.
"""
from __future__ import annotations

import ctypes
import os
import queue
import time
from multiprocessing import Process, Queue, Value
from pathlib import Path

import numpy as np

from .datasets import BadImageError, decode_rgb, load_valid

BETON_FIELDS = ("image", "index", "skipped")
MAX_SIDE = 65535  # FFCV stores image sizes as uint16
DEFAULT_PAGE_SIZE = 1 << 23  # FFCV's default (4 x 2 MiB)
N_EXAMPLES = 5  # bad files named, with their reason, in the summary and in errors


class WriterError(RuntimeError):
    """The ``.beton`` could not be written: a writer worker died or stopped making progress."""


class _Fit:
    """Prepares a decoded image for ``RGBImageField.encode``: resized here (with FFCV's own
    ``resizer``, so that FFCV's call inside ``encode`` does nothing) and checked to be storable,
    so that a failure is a :class:`BadImageError` for ``load_valid`` to skip, not a dead worker."""

    def __init__(self, max_resolution: int | None, write_mode: str, jpeg_quality: int,
                 smart_threshold: int | None, page_size: int):
        self.max_resolution, self.write_mode, self.jpeg_quality = max_resolution, write_mode, jpeg_quality
        self.smart_threshold, self.page_size = smart_threshold, page_size

    def _stored_as_jpeg(self, img: np.ndarray) -> bool:
        if self.write_mode == "smart":  # as RGBImageField.encode decides
            return self.smart_threshold is not None and img.nbytes > self.smart_threshold
        return self.write_mode == "jpg"

    def __call__(self, img: np.ndarray) -> np.ndarray:
        from ffcv.fields.rgb_image import encode_jpeg, resizer

        h, w = img.shape[:2]
        res = self.max_resolution
        if res is not None and max(h, w) > res and int(res / max(h, w) * min(h, w)) < 1:
            raise BadImageError(f"extreme aspect ratio: {w}x{h} would have a side of 0 pixels at "
                                f"max_resolution={res}")
        img = resizer(img, res)
        h, w = img.shape[:2]
        if max(h, w) > MAX_SIDE:
            raise BadImageError(f"{w}x{h} pixels: FFCV stores sides up to {MAX_SIDE} (set a max_resolution)")
        if self._stored_as_jpeg(img):
            # A JPEG is almost always far smaller than its pixels: encode to measure only when it may not fit.
            nbytes = encode_jpeg(img, self.jpeg_quality).nbytes if img.nbytes > self.page_size // 2 else 0
        else:
            nbytes = img.nbytes
        if nbytes > self.page_size:
            raise BadImageError(f"{w}x{h} pixels take {nbytes} bytes, more than an FFCV page "
                                f"({self.page_size}; lower max_resolution or use JPEG)")
        return np.ascontiguousarray(img)


class _Source:
    """Indexable ``(image, index, skipped)`` view of a file list for ``DatasetWriter``."""

    def __init__(self, files: list[Path], fit: _Fit):
        self.files, self.fit = files, fit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, k: int):
        return load_valid(self.files, k, prepare=self.fit)


def _reason(path: Path, fit: _Fit) -> str:
    """Why ``path`` was skipped (decoded again in this process: it failed cleanly in a worker)."""
    try:
        fit(decode_rgb(path))
    except BadImageError as e:
        msg = str(e)
        return msg.split(": ", 1)[1] if msg.startswith("cannot decode ") else msg
    return "not decodable in the writer process"


def _page_size(max_resolution: int | None, write_mode: str) -> int:
    """FFCV's default page, or a larger one that holds a raw image of ``max_resolution``."""
    if write_mode == "jpg" or max_resolution is None:
        return DEFAULT_PAGE_SIZE
    need = max_resolution * max_resolution * 3
    return max(DEFAULT_PAGE_SIZE, 1 << (need - 1).bit_length())


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
    return f"exited with code {code}"


def _watched_writer_class():
    """``DatasetWriter`` whose wait for its workers is a watchdog (FFCV itself waits forever for a
    progress counter that a dead worker never advances). Built lazily: FFCV is optional."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    class WatchedWriter(DatasetWriter):
        def __init__(self, fname: str, fields: dict, *, stall_timeout: float, **kw):
            super().__init__(fname, fields, **kw)
            self.stall_timeout = float(stall_timeout)

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            # FFCV 1.0.2's _write_common, with the wait loop checking on the workers.
            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            allocations_queue: Queue = Queue()
            processes: list[Process] = []
            try:
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)
                done_number = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                               done_number, allocations_queue, *extra_worker_args)
                processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                self._wait(processes, done_number)
                allocation_list = self._allocations(processes, allocations_queue)
                for p in processes:
                    p.join()
                self.finalize(allocation_list)
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                for p in processes:
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                        p.join()
                # Work left in the queue would block interpreter exit on flushing it to dead workers.
                workqueue.cancel_join_thread()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _wait(self, processes: list[Process], done_number) -> None:
            n = self.num_samples
            progress = tqdm(total=n)
            previous, last_change = 0, time.monotonic()
            try:
                while previous != n:
                    val = done_number.value
                    if val != previous:
                        progress.update(val - previous)
                        previous, last_change = val, time.monotonic()
                        continue
                    self._check(processes, f"after {val} of {n} images were written")
                    # the counter is read before the exit codes: only a re-read tells a finished run from a lost one
                    if all(p.exitcode == 0 for p in processes) and done_number.value != n:
                        raise WriterError(f"the FFCV writer workers stopped after {val} of {n} images")
                    if time.monotonic() - last_change > self.stall_timeout:
                        raise WriterError(f"no progress of the FFCV writer for {self.stall_timeout:.0f}s after "
                                          f"{val} of {n} images (a worker is stuck); no .beton was written")
                    time.sleep(0.1)
            finally:
                progress.close()

        def _check(self, processes: list[Process], when: str) -> None:
            for p in processes:
                if p.exitcode not in (None, 0):
                    raise WriterError(f"an FFCV writer worker (pid {p.pid}) {_describe_exit(p.exitcode)} "
                                      f"{when}; no .beton was written")

        def _allocations(self, processes: list[Process], allocations_queue: Queue) -> list:
            """Each worker's page allocations (sent as it exits), watching for one that dies first."""
            out, got, start = [], 0, time.monotonic()
            while got < len(processes):
                try:
                    out.extend(allocations_queue.get(timeout=0.5))
                    got += 1
                    continue
                except queue.Empty:
                    pass
                self._check(processes, "after writing every image")
                if time.monotonic() - start > self.stall_timeout:
                    raise WriterError(f"the FFCV writer workers wrote every image but did not report their "
                                      f"allocations within {self.stall_timeout:.0f}s")
            return out

    return WatchedWriter


def write_beton(files: list[Path], path: str | os.PathLike, *, max_resolution: int | None = 512,
                jpeg_quality: int = 90, write_mode: str = "jpg", num_workers: int = 2,
                max_bad_fraction: float = 0.01, stall_timeout: float = 600.0,
                chunksize: int = 16) -> dict:
    """Write ``files`` to ``path`` (through a temporary name, renamed when complete).

    Returns ``{"images": n, "bad": number of bad files, "bad_files": their paths (sorted),
    "examples": up to five "path: reason" strings}``. More bad files than ``max_bad_fraction`` of
    the dataset is a :class:`~pretrain.data.datasets.BadImageError`; a worker that dies, or no
    progress for ``stall_timeout`` seconds (``chunksize`` images are the unit of progress), is a
    :class:`WriterError`. Either leaves no ``.beton`` behind.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    page_size = _page_size(max_resolution, write_mode)
    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    fit = _Fit(max_resolution, write_mode, jpeg_quality, image_field.smart_threshold, page_size)
    try:
        writer = _watched_writer_class()(str(tmp), {
            "image": image_field,
            "index": IntField(),
            "skipped": IntField(),
        }, num_workers=num_workers, page_size=page_size, stall_timeout=stall_timeout)
        writer.from_indexed_dataset(_Source(files, fit), chunksize=chunksize)
        meta = Reader(str(tmp)).metadata
        skipped = np.asarray(meta["f2"])
        used = np.asarray(meta["f1"])
        n = len(files)
        bad = sorted({(int(u) - d) % n for u, s in zip(used, skipped) for d in range(1, int(s) + 1)})
        examples = [f"{files[i]}: {_reason(files[i], fit)}" for i in bad[:N_EXAMPLES]]
        if len(bad) > max_bad_fraction * n:
            raise BadImageError(f"{len(bad)} of {n} images are bad (over max_bad_fraction={max_bad_fraction}); "
                                f"e.g. {'; '.join(examples)}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"images": n, "bad": len(bad), "bad_files": [str(files[i]) for i in bad], "examples": examples}
