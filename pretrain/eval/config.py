"""Typed configuration of the online evaluation during pretraining (the ``eval:`` section of a pretrain YAML).

:data:`EVAL_RULES` and :func:`eval_problems` are every rule of the section; ``load_config`` checks them
before anything is built (``python -m pretrain`` exits 64 on the first broken one), including that the
held-out split exists. :func:`resolve_split` is the one place that says which folder ``eval.split`` means.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrain.config_rules import NON_EMPTY, NON_NEGATIVE, Problem, Rule, at_least, check_fields


@dataclass
class EvalConfig:
    """Held-out evaluation of the teacher while it trains (:mod:`pretrain.eval.online`)."""

    every_epochs: int = 0  # evaluate after every N completed epochs; 0: off
    at_end: bool = False  # also after the last epoch of the schedule (once, if it is a multiple of N anyway)
    # The held-out images: a folder, relative to data.root unless absolute. What is scored follows from
    # the layout around it (pretrain.eval.datasets.HeldOutSplit): toy scenes' semantic/ and instances/,
    # COCO's annotations/instances_<split>.json (+ COCO-Stuff-27 maps in annotations/<split>/), else
    # prototype health only.
    split: str = "val2017"
    max_images: int = 0  # the first N images of the split (sorted by name); 0: all
    batch_size: int = 16  # per rank
    resolution: int = 0  # shorter side + centre crop; 0: native for toy scenes, 320 elsewhere (SlotCon Sec. 4.4)
    num_workers: int = 0  # data-loader workers of the evaluation
    num_images: int = 4  # held-out images in the TensorBoard picture; 0: none

    @property
    def enabled(self) -> bool:
        """Whether any evaluation is scheduled."""
        return self.every_epochs > 0 or self.at_end


_AT_LEAST_8 = at_least(8)

EVAL_RULES: dict[str, Rule] = {
    "every_epochs": NON_NEGATIVE,  # 0: off
    "split": NON_EMPTY,
    "max_images": NON_NEGATIVE,  # 0: all
    "batch_size": at_least(1),
    # 0: the layout's default; below 8 pixels even a stride-8 encoder has no feature cell left
    "resolution": Rule("0 (the layout's default) or >= 8",
                       lambda v: _AT_LEAST_8.ok(v) or (v == 0 and not isinstance(v, bool))),
    "num_workers": NON_NEGATIVE,
    "num_images": NON_NEGATIVE,
}


def resolve_split(split: str, data_root: str) -> Path:
    """The folder of held-out images ``eval.split`` names: itself when absolute, else under ``data.root``."""
    p = Path(split)
    return p if p.is_absolute() else Path(data_root) / p


def eval_problems(ev: EvalConfig, data) -> Iterator[Problem]:
    """Every broken rule of the ``eval`` section (``data``: the run's ``DataConfig``). ``every_epochs`` above
    ``train.epochs`` is allowed (only ``at_end`` then evaluates): ``python -m pretrain.demo train.epochs=2`` keeps
    the demo's every-5 schedule.

    The split must exist when evaluation is on, except where the loader is about to write it: the toy
    scenes, generated at ``data.root`` on first use (``dataset: toy``, ``loader: pil``, no ``meta.json`` yet).
    """
    yield from check_fields(ev, "eval", EVAL_RULES)
    if not ev.enabled:
        return
    folder = resolve_split(ev.split, data.root)
    generated = (str(data.dataset) == "toy" and str(data.loader) == "pil"
                 and not (Path(data.root) / "meta.json").is_file() and not Path(ev.split).is_absolute())
    if not folder.is_dir() and not generated:
        yield Problem("eval.split", ev.split, f"a folder of held-out images ({folder} does not exist)")


__all__ = ["EvalConfig", "EVAL_RULES", "resolve_split", "eval_problems"]
