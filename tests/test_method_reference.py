"""Method-level reference values: each method's loss recomputed by hand from its own intermediates.

The grouping modules' outputs are captured with forward hooks during the method's forward pass;
from them a plain implementation (loops over views, images and slots; no project loss helper)
computes the loss the paper defines, and the method's reported value must equal it. Each test of
agreement has a twin that breaks the method in one place (views swapped, a wrong index) and checks
that the same comparison then fails, so the reference really constrains what it checks.

- SlotCon's slot loss ``loss_slot`` (SlotCon Eq. 5-7, with the recipe's 2·τc scaling).
- ObjGlobal's object loss ``loss_obj`` (paper 000, Eq. 2 with N^ALL / N^IMG, Eq. 3), with the
  Hungarian matching σ by ``scipy.optimize.linear_sum_assignment``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

import pretrain.losses.slot_contrast as slot_contrast_module
import pretrain.methods.objglobal as objglobal_module
import pretrain.methods.slotcon as slotcon_module
from pretrain.methods import GROUPINGS, ModelConfig, build_method, register_grouping
from pretrain.models.grouping import GroupingOutput
from pretrain.models.query_slot_attention import QuerySlotAttention

torch.set_num_threads(1)
B, SIZE = 4, 64


def _batch(seed: int = 0) -> dict[str, Tensor]:
    """Two independent views per image (full intersection boxes, no flips): the two views' slots differ."""
    g = torch.Generator().manual_seed(seed)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * B)
    return {
        "view1": torch.randn(B, 3, SIZE, SIZE, generator=g), "view2": torch.randn(B, 3, SIZE, SIZE, generator=g),
        "box1": full, "box2": full.clone(),
        "flip1": torch.zeros(B, dtype=torch.uint8), "flip2": torch.zeros(B, dtype=torch.uint8),
        "skipped": torch.zeros(B, dtype=torch.int64), "index": torch.arange(B),
    }


def _forward_capturing(method: nn.Module, part: str) -> tuple[dict[str, Tensor], list, list]:
    """Run ``method`` on the batch; return its outputs and every output of the student grouping
    ``part`` and of ``teacher_<part>``, in call order."""
    student, teacher = [], []
    hooks = [getattr(method, part).register_forward_hook(lambda m, i, o: student.append(o)),
             getattr(method, f"teacher_{part}").register_forward_hook(lambda m, i, o: teacher.append(o))]
    try:
        out = method(_batch())
    finally:
        for h in hooks:
            h.remove()
    return out, student, teacher


def _cos(x: Tensor, y: Tensor) -> float:
    x, y = x.double(), y.double()
    return float(x @ y / (x.norm() * y.norm()))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _agree(method_value: float, reference: float) -> bool:
    return math.isclose(method_value, reference, rel_tol=1e-5, abs_tol=1e-6)


# ---- SlotCon: slot contrast, Eq. 5-7 -------------------------------------------------------------
def _active(logits: Tensor, image: int, slot: int) -> bool:
    """Eq. 5: slot ``slot`` of ``image`` is active iff it wins the argmax over K at some pixel."""
    return bool((logits[image].argmax(dim=0) == slot).any())


def reference_slot_loss(slots_s: Tensor, logits_s: Tensor, slots_t: Tensor, logits_t: Tensor,
                        predictor: nn.Module, tau: float) -> float:
    """``Σ_{(l, l')} 2τc · mean_{(b, k) selected} L^InfoNCE`` of SlotCon Eq. 6-7, by loops.

    Inputs are ``[view1; view2]`` stacks (``2B`` rows). Direction ``l -> l'`` selects student slot
    ``(b, k)`` of view l when it is active there and prototype k is active in the teacher's view l';
    its positive is teacher slot ``(b, k)`` of view l', its negatives every active teacher slot of
    view l' (every image). The predictor sees the selected slots of one direction as one batch
    (its BatchNorm statistics), as in the method.
    """
    b, k = logits_s.shape[0] // 2, logits_s.shape[1]
    total = 0.0
    for l, lp in ((0, 1), (1, 0)):
        selected = [(n, j) for n in range(b) for j in range(k)
                    if _active(logits_s, l * b + n, j) and _active(logits_t, lp * b + n, j)]
        keys = [(n, j) for n in range(b) for j in range(k) if _active(logits_t, lp * b + n, j)]
        preds = predictor(torch.stack([slots_s[l * b + n, j] for n, j in selected]))
        losses = []
        for pred, (n, j) in zip(preds, selected):
            sims = {(m, i): _cos(pred, slots_t[lp * b + m, i]) / tau for m, i in keys}
            losses.append(_logsumexp(list(sims.values())) - sims[(n, j)])
        total += 2.0 * tau * sum(losses) / len(losses)
    return total


def _slotcon_value_and_reference() -> tuple[float, float, int]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16)
    method = build_method(cfg).train()
    out, student, teacher = _forward_capturing(method, "prototypes")
    (slots_s, logits_s), (slots_t, logits_t) = student[0], teacher[0]
    with torch.no_grad():
        ref = reference_slot_loss(slots_s, logits_s, slots_t, logits_t, method.predictor, cfg.tau_c)
    n_active = sum(_active(logits_t, n, j) for n in range(2 * B) for j in range(8))
    return out["loss_slot"].item(), ref, n_active


def test_slotcon_slot_loss_equals_eq_6_7_by_hand() -> None:
    value, ref, n_active = _slotcon_value_and_reference()
    assert n_active >= 2 * B + 4, "too few active slots for the negatives to matter"
    assert ref > 0.1
    assert _agree(value, ref), (value, ref)


def test_slotcon_reference_fails_when_the_teacher_views_are_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug: the gathered teacher slots and masks of view l' come from view l.
    def swapped_gather(t: Tensor) -> Tensor:
        return torch.cat([t[B:], t[:B]])

    monkeypatch.setattr(slotcon_module, "concat_all_gather", swapped_gather)
    value, ref, _ = _slotcon_value_and_reference()
    assert not _agree(value, ref), (value, ref)


def test_slotcon_reference_fails_with_a_wrong_positive_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug: each positive is looked up one image further on in the gathered teacher slots.
    real = slot_contrast_module.slot_infonce

    def shifted(pred: Tensor, query_index: Tensor, teacher_all: Tensor, mask_all: Tensor, tau: float,
                num_keys: int | None = None) -> Tensor:
        return real(pred, (query_index + 8) % teacher_all.shape[0], teacher_all, mask_all, tau, num_keys)

    monkeypatch.setattr(slot_contrast_module, "slot_infonce", shifted)
    value, ref, _ = _slotcon_value_and_reference()
    assert not _agree(value, ref), (value, ref)


# ---- ObjGlobal: Hungarian-matched object losses, paper 000 Eq. 2-3 -------------------------------
PERM = [1, 2, 3, 0]  # not an involution: σ_12 and σ_21 differ


class ViewShuffledQSA(QuerySlotAttention):
    """BO-QSA whose second, fourth, ... call returns its slots in the order :data:`PERM`.

    ObjGlobal runs each network on view 1, then view 2, so the views' slots are no longer aligned
    by index (as they would be without shared queries) and only the matching σ pairs them.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:  # noqa: D102
        out = super().forward(feats, noise)
        self.calls += 1
        if self.calls % 2 == 1:
            return out
        p = PERM
        return GroupingOutput(out.slots[:, p], out.assign[:, p], out.logits[:, p], out.similarity[:, p])


@pytest.fixture
def shuffled_grouping() -> Iterator[None]:
    register_grouping("test_view_shuffled_qsa")(
        lambda cfg, dim: ViewShuffledQSA(dim, cfg.num_prototypes, iters=cfg.slot_iters, eps=cfg.slot_eps,
                                         pos_embed=cfg.slot_pos_embed))
    yield
    GROUPINGS.pop("test_view_shuffled_qsa")


def hungarian_by_hand(x: Tensor, y: Tensor) -> list[int]:
    """σ of Eq. 2 for one image: ``x[i]`` is matched to ``y[σ[i]]``, maximising the summed cosine."""
    s = x.shape[0]
    sim = np.array([[_cos(x[i], y[j]) for j in range(s)] for i in range(s)])
    rows, cols = linear_sum_assignment(sim, maximize=True)
    sigma = [0] * s
    for i, j in zip(rows, cols):
        sigma[i] = int(j)
    return sigma


def reference_object_loss(kind: str, student: list[Tensor], teacher: list[Tensor], method: nn.Module,
                          tau: float) -> tuple[float, list[list[list[int]]]]:
    """Paper 000's object loss averaged over the ``2·B·S`` tokens, by loops; returns it and σ.

    ``student[a]``, ``teacher[a]``: ``(B, S, D)`` slots of view a. σ_a(b) matches the student's
    tokens of view a to the teacher's of view ā (Hungarian, scipy). Queries
    ``q = predictor(head(s))`` and keys ``k = teacher_head(t)`` run once per view (BatchNorm over
    the view's B·S tokens, as in the method). For token ``(a, b, i)`` with positive
    ``(ā, b, σ_a(b)[i])``:

    - ``ctr_all`` (Eq. 2, N^ALL): ``-log softmax`` of ``cos(q, k)/τ`` over every key of both views of
      every image except the query's own ``(a, b, i)``;
    - ``ctr_img`` (Eq. 2, N^IMG): the same over the keys of image b only (both views), own excluded;
    - ``cossim`` (Eq. 3): ``-cos(q, k_positive)``.
    """
    b, s = student[0].shape[:2]
    sigma = [[hungarian_by_hand(student[a][n], teacher[1 - a][n]) for n in range(b)] for a in (0, 1)]
    q = [method.object_predictor(method.object_head(student[a].flatten(0, 1))).view(b, s, -1) for a in (0, 1)]
    k = [method.teacher_object_head(teacher[a].flatten(0, 1)).view(b, s, -1) for a in (0, 1)]
    losses = []
    for a in (0, 1):
        for n in range(b):
            for i in range(s):
                pos = (1 - a, n, sigma[a][n][i])
                query = q[a][n, i]
                if kind == "cossim":
                    losses.append(-_cos(query, k[pos[0]][pos[1], pos[2]]))
                    continue
                images = range(b) if kind == "ctr_all" else [n]
                logits = {(a2, m, j): _cos(query, k[a2][m, j]) / tau
                          for a2 in (0, 1) for m in images for j in range(s) if (a2, m, j) != (a, n, i)}
                losses.append(_logsumexp(list(logits.values())) - logits[pos])
    return sum(losses) / len(losses), sigma


def _objglobal_value_and_reference(kind: str, grouping: str) -> tuple[float, float, list]:
    torch.manual_seed(0)
    cfg = ModelConfig(method="objglobal", grouping=grouping, object_loss=kind, arch="resnet18", num_prototypes=4,
                      dim_hidden=32, dim_out=16, slot_iters=2)
    method = build_method(cfg).train()
    out, student, teacher = _forward_capturing(method, "grouping")
    assert len(student) == len(teacher) == 2  # one pass per view and network
    with torch.no_grad():
        ref, sigma = reference_object_loss(kind, [o.slots for o in student], [o.slots for o in teacher], method,
                                           cfg.tau_obj)
    return out["loss_obj"].item(), ref, sigma


@pytest.mark.parametrize(("kind", "grouping"), [
    ("ctr_all", "slot_attention"), ("ctr_img", "softargmax"), ("cossim", "qsa"),
    ("ctr_all", "test_view_shuffled_qsa"), ("ctr_img", "test_view_shuffled_qsa"), ("cossim", "test_view_shuffled_qsa"),
])
def test_objglobal_object_loss_equals_eq_2_3_by_hand(shuffled_grouping: None, kind: str, grouping: str) -> None:
    value, ref, sigma = _objglobal_value_and_reference(kind, grouping)
    if grouping == "test_view_shuffled_qsa":
        assert any(s != list(range(4)) for per_view in sigma for s in per_view), "σ is the identity: no test of it"
    assert _agree(value, ref), (value, ref)


Mutation = Callable[..., Tensor]


def _swap_key_views(real: Mutation) -> Mutation:
    return lambda kind, q1, q2, k1, k2, p12, p21, tau: real(kind, q1, q2, k2, k1, p12, p21, tau)


def _swap_matchings(real: Mutation) -> Mutation:
    return lambda kind, q1, q2, k1, k2, p12, p21, tau: real(kind, q1, q2, k1, k2, p21, p12, tau)


@pytest.mark.parametrize("kind", ["ctr_all", "ctr_img", "cossim"])
@pytest.mark.parametrize("bug", ["keys_of_the_same_view", "matchings_swapped", "no_matching"])
def test_objglobal_reference_fails_when_the_method_is_broken(
    shuffled_grouping: None, monkeypatch: pytest.MonkeyPatch, kind: str, bug: str
) -> None:
    if bug == "no_matching":  # slot i paired with slot i of the other view
        monkeypatch.setattr(objglobal_module, "match_slots",
                            lambda x, y: torch.arange(x.shape[1]).expand(x.shape[0], -1).clone())
    else:
        wrap = _swap_key_views if bug == "keys_of_the_same_view" else _swap_matchings
        monkeypatch.setattr(objglobal_module, "object_loss", wrap(objglobal_module.object_loss))
    value, ref, _ = _objglobal_value_and_reference(kind, "test_view_shuffled_qsa")
    assert not _agree(value, ref), (value, ref)
