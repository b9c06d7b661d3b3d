"""Defining properties of the grouping modules: Slot Attention, BO-QSA, soft-argmax pooling."""
from __future__ import annotations

import pytest
import torch

from pretrain.methods.registry import build_grouping_module
from pretrain.models.grouping import SlotConGrouping, resample_shared_noise
from pretrain.models.query_slot_attention import QuerySlotAttention
from pretrain.models.slot_attention import SlotAttention
from pretrain.models.softargmax import SoftArgmaxPooling, expected_coordinates, soft_argmax
from pretrain.models.teacher import make_teacher

torch.set_num_threads(1)


def _feats(b: int = 2, d: int = 16, h: int = 5, w: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


# ---- Slot Attention ------------------------------------------------------------------------------
def test_slot_attention_shapes_and_assignment_sums_to_one_per_pixel() -> None:
    torch.manual_seed(0)
    sa = SlotAttention(16, num_slots=4, iters=3)
    out = sa(_feats())
    assert out.slots.shape == (2, 4, 16)
    assert out.assign.shape == out.logits.shape == out.similarity.shape == (2, 4, 5, 6)
    torch.testing.assert_close(out.assign.sum(dim=1), torch.ones(2, 5, 6))
    assert out.assign.min() > 0
    # The assignment is the softmax over slots of the logits, not over pixels.
    torch.testing.assert_close(out.assign, out.logits.softmax(dim=1))
    assert out.similarity.abs().max() <= 1.0 + 1e-5


def test_slot_attention_is_permutation_equivariant_in_the_initial_slots() -> None:
    torch.manual_seed(0)
    sa = SlotAttention(16, num_slots=5, iters=3).eval()
    feats = _feats()
    init = torch.randn(2, 5, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    a, b = sa.run(feats, init), sa.run(feats, init[:, perm])
    torch.testing.assert_close(b.slots, a.slots[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.assign, a.assign[:, perm], rtol=1e-5, atol=1e-6)
    # A different (non-permuted) initialisation really changes the output: the check has teeth.
    assert not torch.allclose(sa.run(feats, init.flip(-1)).slots, a.slots, atol=1e-3)


def test_slot_attention_applies_exactly_t_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    feats, init = _feats(), torch.randn(2, 4, 16)
    for t in (1, 3):
        sa = SlotAttention(16, num_slots=4, iters=t)
        calls = []
        orig = sa.step
        monkeypatch.setattr(sa, "step", lambda s, k, v: calls.append(1) or orig(s, k, v))
        out = sa.run(feats, init)
        assert len(calls) == t
        # Same as applying the step by hand t times...
        k, v = sa.inputs(feats)
        slots = init
        for _ in range(t):
            slots, _, _ = orig(slots, k, v)
        torch.testing.assert_close(out.slots, slots)
        # ...and different from t + 1 steps.
        assert not torch.allclose(orig(slots, k, v)[0], out.slots, atol=1e-4)


def test_slot_attention_gaussian_init_uses_mu_and_sigma_and_noise() -> None:
    torch.manual_seed(0)
    sa = SlotAttention(8, num_slots=3)
    noise = torch.randn(2, 3, 8)
    init = sa.initial_slots(2, noise)
    torch.testing.assert_close(init, sa.slots_mu + sa.slots_log_sigma.exp() * noise)
    # Same noise -> same output; gradients reach mu and log sigma.
    feats = _feats(d=8)
    a, b = sa(feats, noise), sa(feats, noise)
    torch.testing.assert_close(a.slots, b.slots)
    a.slots.sum().backward()
    assert sa.slots_mu.grad.abs().sum() > 0 and sa.slots_log_sigma.grad.abs().sum() > 0


def test_soft_position_embedding_breaks_translation_invariance() -> None:
    torch.manual_seed(0)
    feats, init = _feats(), torch.randn(2, 4, 16)
    rolled = feats.roll(2, dims=-1)
    with_pos = SlotAttention(16, 4, iters=2)
    no_pos = SlotAttention(16, 4, iters=2, pos_embed=False)
    no_pos.load_state_dict({k: v for k, v in with_pos.state_dict().items() if not k.startswith("pos.")})
    # Without a position embedding the input is a set: rolling the pixels changes nothing.
    torch.testing.assert_close(no_pos.run(rolled, init).slots, no_pos.run(feats, init).slots, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_pos.run(rolled, init).slots, with_pos.run(feats, init).slots, atol=1e-4)


# ---- BO-QSA --------------------------------------------------------------------------------------
def test_qsa_queries_get_gradient_only_through_the_straight_through_step() -> None:
    torch.manual_seed(0)
    qsa = QuerySlotAttention(16, num_slots=4, iters=3)
    feats = _feats()
    out = qsa(feats)
    out.slots.pow(2).sum().backward()
    grad_queries = qsa.queries.grad.clone()
    grad_params = {n: p.grad.clone() for n, p in qsa.named_parameters() if n != "queries"}

    # Reference: the detached T iterations, then one step from a leaf standing for SG(slots).
    qsa.zero_grad()
    k, v = qsa.inputs(feats)
    inner, _, _ = qsa.iterate(qsa.queries.expand(2, -1, -1).detach(), k, v, 3)
    leaf = inner.detach().requires_grad_(True)
    final, _, _ = qsa.step(leaf, k, v)
    torch.testing.assert_close(final, out.slots)  # forward value = SA applied to SG(slots_T)
    final.pow(2).sum().backward()
    # The queries' gradient is exactly d loss / d (input of the final step), summed over the batch.
    torch.testing.assert_close(grad_queries, leaf.grad.sum(dim=0, keepdim=True))
    # Parameters see only the final step: the detached iterations contribute nothing.
    for n, p in qsa.named_parameters():
        if n != "queries":
            torch.testing.assert_close(grad_params[n], p.grad, msg=n)


def test_qsa_runs_t_detached_plus_one_final_step(monkeypatch: pytest.MonkeyPatch) -> None:
    qsa = QuerySlotAttention(16, num_slots=4, iters=2)
    grad_modes = []
    orig = qsa.step
    monkeypatch.setattr(qsa, "step", lambda s, k, v: grad_modes.append(torch.is_grad_enabled()) or orig(s, k, v))
    out = qsa(_feats())
    assert grad_modes == [False, False, True]
    assert out.slots.requires_grad
    torch.testing.assert_close(out.assign.sum(dim=1), torch.ones(2, 5, 6))


# ---- soft-argmax ---------------------------------------------------------------------------------
def test_soft_argmax_one_hot_returns_that_pixel_and_uniform_returns_centre() -> None:
    h, w = 5, 9
    maps = torch.zeros(1, 2, h, w)
    maps[0, 0, 1, 6] = 1.0  # row 1, column 6
    maps[0, 1] = 1.0 / (h * w)
    xy = expected_coordinates(maps)
    torch.testing.assert_close(xy[0, 0], torch.tensor([2 * 6 / (w - 1) - 1, 2 * 1 / (h - 1) - 1]))  # Eq. 12-13
    torch.testing.assert_close(xy[0, 1], torch.zeros(2), atol=1e-6, rtol=0)
    # Through the spatial softmax (Eq. 11): a dominant logit, and constant logits.
    logits = torch.zeros(1, 2, h, w)
    logits[0, 0, 4, 0] = 50.0
    xy = soft_argmax(logits)
    torch.testing.assert_close(xy[0, 0], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(xy[0, 1], torch.zeros(2), atol=1e-6, rtol=0)


def test_softargmax_pooling_slots_are_attention_weighted_features() -> None:
    torch.manual_seed(0)
    mod = SoftArgmaxPooling(16, num_slots=3)
    feats = _feats()
    out = mod(feats)
    maps = mod.attn(feats).flatten(2).softmax(-1)  # Eq. 11
    torch.testing.assert_close(out.slots, torch.einsum("bkn,bdn->bkd", maps, feats.flatten(2)))  # Eq. 16
    assert out.coords.shape == (2, 3, 2) and out.coords.abs().max() <= 1.0
    torch.testing.assert_close(out.assign.sum(dim=1), torch.ones(2, 5, 6))


# ---- factory and SlotCon adapter -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["slot_attention", "qsa", "softargmax"])
def test_slotcon_adapter_shares_one_noise_between_student_and_teacher(name: str) -> None:
    torch.manual_seed(0)
    student = SlotConGrouping(build_grouping_module(name, 16, 4, iters=2))
    teacher = make_teacher(student)
    resample_shared_noise(student, teacher)
    z = _feats()
    slots_s, logits_s = student(z)
    slots_t, logits_t = teacher(z)
    # Same weights and the same draw: identical outputs, so slot k means the same in both.
    torch.testing.assert_close(slots_s, slots_t)
    torch.testing.assert_close(logits_s, logits_t)
    assert slots_s.shape == (2, 4, 16) and logits_s.shape == (2, 4, 5, 6)


def test_build_grouping_module_rejects_unknown_names_and_bad_inputs() -> None:
    with pytest.raises(ValueError, match="model.grouping"):
        build_grouping_module("kmeans", 16, 4)
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        SlotAttention(16, 4)(torch.zeros(2, 8, 3, 3))
