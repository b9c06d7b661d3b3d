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

    def __init__(self, weights: str, state: dict | None = None) -> None:
        """``state``: the file's ``state_dict`` when the caller has read it already (else read when needed)."""
        self.weights = weights
        self.state = state

    def before_train(self, runner) -> None:
        state, self.state = self.state, None  # needed once: not held through training
        if runner.iter > 0:
            return
        if state is None:
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


class PreemptionHook(Hook):
    """SIGTERM / SIGUSR1 (SLURM preemption or time limit): finish the iteration, checkpoint, exit 75.

    Uses the pretraining engine's stop flag (``pretrain.engine.signals``), agreed across ranks so every
    rank stops after the same iteration; ``--resume`` then continues from exactly that iteration
    instead of the last interval checkpoint (up to 3000-9000 iterations earlier).
    """

    priority = "VERY_LOW"

    def __init__(self) -> None:
        self._previous: dict = {}

    def before_train(self, runner) -> None:
        from pretrain.engine.signals import clear_stop, install_handlers

        clear_stop()
        self._previous = install_handlers()

    def after_train(self, runner) -> None:
        from pretrain.engine.signals import restore_handlers

        restore_handlers(self._previous)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        import torch
        from mmengine.dist import all_reduce, get_world_size

        from pretrain.engine.signals import EXIT_PREEMPTED, stop_reason, stop_requested

        flag = torch.tensor([1.0 if stop_requested() else 0.0])
        if get_world_size() > 1:
            flag = flag.cuda() if torch.cuda.is_available() else flag
            all_reduce(flag, op="max")
        if float(flag.max()) == 0.0:
            return
        name = f"iter_{runner.iter + 1}.pth"
        runner.save_checkpoint(runner.work_dir, name, save_optimizer=True, save_param_scheduler=True, by_epoch=False)
        if is_main_process():
            (Path(runner.work_dir) / "last_checkpoint").write_text(str(Path(runner.work_dir) / name))
        runner.logger.warning(f"stop requested ({stop_reason() or 'another rank'}): saved {name} after iteration "
                              f"{runner.iter + 1}; exiting with {EXIT_PREEMPTED}, rerun with --resume")
        raise SystemExit(EXIT_PREEMPTED)
