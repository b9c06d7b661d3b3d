"""Similarities, logits and pooled updates stay float32 under autocast (CPU bfloat16 here).

Autocast runs ``einsum``/``matmul``/``bmm`` in half precision even on float32 inputs; the functions
below document float32 results because SlotCon's temperatures (0.04-0.1) and the Hungarian matching
amplify half-precision errors. Two levels:

- each function, given float32 inputs under autocast, returns float32 equal to its plain result;
- each method's loss (SlotCon with every grouping, ObjGlobal with every object loss) under autocast
  equals its float32 loss within 1e-4 relative. To isolate the functions under test from the network
  layers (whose half-precision run is what autocast is for), every Conv2d/Linear/BN/LayerNorm/GRUCell
  of the method runs in float32 in both passes (:func:`network_layers_in_float32`): what differs
  between the passes is only what these functions compute.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pretrain.losses.global_contrast import global_contrastive_loss
from pretrain.losses.object_losses import ctr_all_loss, ctr_img_loss, cossim_loss, match_slots
from pretrain.methods import ModelConfig, build_method
from pretrain.models.grouping import pixel_slot_cosine
from pretrain.models.query_slot_attention import QuerySlotAttention
from pretrain.models.slot_attention import SlotAttention
from pretrain.models.softargmax import SoftArgmaxPooling
from tests.test_family_methods import toy_batch

torch.set_num_threads(1)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
NETWORK_LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GRUCell)


def network_layers_in_float32(model: nn.Module) -> nn.Module:
    """Make every network layer of ``model`` compute in float32 even inside autocast (in place)."""
    for m in model.modules():
        if isinstance(m, NETWORK_LAYERS):
            orig = m.forward

            def fp32_forward(*args, _orig=orig, **kw):
                args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
                with torch.autocast("cpu", enabled=False):
                    return _orig(*args, **kw)

            m.forward = fp32_forward
    return model


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_f32_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float32, f"{what}: {got.dtype} under autocast"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)


def test_pixel_slot_cosine_is_float32() -> None:
    pix, slots = _rand(2, 12, 16), _rand(2, 5, 16, seed=1)
    want = pixel_slot_cosine(pix, slots, (3, 4))
    with torch.autocast(**BF16):
        got = pixel_slot_cosine(pix, slots, (3, 4))
    _assert_f32_close(got, want, "pixel_slot_cosine")


@pytest.mark.parametrize("cls", [SlotAttention, QuerySlotAttention])
def test_slot_attention_logits_and_updates_are_float32(cls: type) -> None:
    torch.manual_seed(0)
    sa = network_layers_in_float32(cls(16, 5, iters=2))
    feats, noise = _rand(2, 16, 4, 4), _rand(2, 5, 16, seed=2)
    want = sa(feats, noise)
    with torch.autocast(**BF16):
        got = sa(feats, noise)
        k, v = sa.inputs(feats)
        slots, attn, logits = sa.step(sa.initial_slots(2, noise), k, v)
        _, attn0, logits0 = sa.iterate(sa.initial_slots(2, noise), k, v, 0)
    for name in ("slots", "assign", "logits", "similarity"):
        _assert_f32_close(getattr(got, name), getattr(want, name), f"{cls.__name__}.{name}")
    for name, t in (("step slots", slots), ("attn", attn), ("logits", logits), ("T=0 attn", attn0),
                    ("T=0 logits", logits0)):
        assert t.dtype == torch.float32, (name, t.dtype)


def test_softargmax_logits_coordinates_and_slots_are_float32() -> None:
    torch.manual_seed(0)
    sa = SoftArgmaxPooling(16, 5)  # its attention logits are SlotCon-style similarities: float32 by design
    feats = _rand(2, 16, 6, 5)
    want = sa(feats)
    with torch.autocast(**BF16):
        got = sa(feats)
    for name in ("slots", "assign", "logits", "similarity", "coords"):
        _assert_f32_close(getattr(got, name), getattr(want, name), f"softargmax.{name}")


def test_matching_and_object_losses_are_float32() -> None:
    b, s, d = 3, 4, 16
    q1, q2, k1, k2 = (_rand(b, s, d, seed=i) for i in range(4))
    want_perm = match_slots(q1, k2)
    with torch.autocast(**BF16):
        perm = match_slots(q1, k2)
        sim_dtype = torch.einsum("bid,bjd->bij", q1, k2).dtype  # what autocast does to a bare einsum
    assert sim_dtype == torch.bfloat16  # the premise: without a local opt-out the matching would be bf16
    assert torch.equal(perm, want_perm)
    p12, p21 = match_slots(q1, k2), match_slots(q2, k1)
    for fn in (ctr_all_loss, ctr_img_loss, cossim_loss):
        want = fn(q1, q2, k1, k2, p12, p21, 0.1, reduction="none")
        with torch.autocast(**BF16):
            got = fn(q1, q2, k1, k2, p12, p21, 0.1, reduction="none")
        _assert_f32_close(got, want, fn.__name__)
    want = global_contrastive_loss(q1[:, 0], q2[:, 0], k1[:, 0], k2[:, 0], 0.1)
    with torch.autocast(**BF16):
        got = global_contrastive_loss(q1[:, 0], q2[:, 0], k1[:, 0], k2[:, 0], 0.1)
    _assert_f32_close(got, want, "global_contrastive_loss")


METHOD_CASES = [
    ("slotcon", "prototypes", "ctr_all"),
    ("slotcon", "slot_attention", "ctr_all"),
    ("slotcon", "qsa", "ctr_all"),
    ("slotcon", "softargmax", "ctr_all"),
    ("objglobal", "slot_attention", "ctr_all"),
    ("objglobal", "qsa", "ctr_img"),
    ("objglobal", "softargmax", "cossim"),
    ("objglobal", "slot_attention", "cossim"),
    ("objglobal", "softargmax", "ctr_img"),
]


def _loss(method: nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> dict[str, torch.Tensor]:
    # A copy: SlotCon's forward moves its centre, and both passes must start from the same state.
    m = network_layers_in_float32(copy.deepcopy(method))
    torch.manual_seed(5)  # Slot Attention's initialisation draw
    with torch.autocast(**BF16, enabled=autocast):
        return m(batch)


@pytest.mark.parametrize(("method", "grouping", "object_loss"), METHOD_CASES)
def test_method_loss_under_autocast_equals_float32(method: str, grouping: str, object_loss: str) -> None:
    cfg = ModelConfig(method=method, grouping=grouping, object_loss=object_loss, arch="resnet18",
                      num_prototypes=4, dim_hidden=32, dim_out=16, slot_iters=2)
    torch.manual_seed(0)
    m = build_method(cfg).train()
    batch = toy_batch(b=2, size=32)
    want = _loss(m, batch, autocast=False)
    got = _loss(m, batch, autocast=True)
    terms = [k for k in want if k.startswith("loss")]
    assert len(terms) >= 3, terms
    for k in terms:
        assert got[k].dtype == torch.float32, (k, got[k].dtype)
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=f"{method}/{grouping}/{object_loss} {k}")
