"""mmengine hooks of the segmentation transfer: backbone-load verification and metrics JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from .weights import load_converted, mismatched_tensors


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


class VerifyBackboneHook(Hook):
    """Before the first iteration: every backbone tensor must equal the converted file's.

    mmengine's ``Pretrained`` init loads with ``strict=False`` and only logs what it skipped; this
    turns a partially random backbone into an error. Skipped after a resume (the weights then come
    from the run's own checkpoint).
    """

    priority = "VERY_HIGH"

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def before_train(self, runner) -> None:
        if runner.iter > 0:
            return
        state, _ = load_converted(self.weights)
        bad = mismatched_tensors(_unwrap(runner.model).backbone, state)
        if bad:
            raise RuntimeError(
                f"{len(bad)} backbone tensors differ from {self.weights} after initialisation (e.g. {bad[:5]}): "
                "the pretrained weights were not loaded; stopping before training")
        runner.logger.info(f"verified: all {len(state)} backbone tensors equal {self.weights}")


class MetricsJsonHook(Hook):
    """Writes each evaluation's metrics (mIoU, mAcc, aAcc) as JSON in the work dir for later collection.

    ``metrics.json`` (last validation), ``metrics_history.jsonl`` (one line per validation),
    ``test_metrics.json`` (``--eval-only``).
    """

    priority = "LOW"

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def _record(self, runner, metrics: dict | None) -> dict[str, Any]:
        return {
            **self.info,
            "iter": int(runner.iter),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        }

    @staticmethod
    def _write(path: Path, record: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if not is_main_process():
            return
        rec = self._record(runner, metrics)
        work = Path(runner.work_dir)
        self._write(work / "metrics.json", rec)
        with open(work / "metrics_history.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def after_test_epoch(self, runner, metrics=None) -> None:
        if is_main_process():
            self._write(Path(runner.work_dir) / "test_metrics.json", self._record(runner, metrics))
