"""The SlotCon method module: API, invariances, centre timing, teacher (SlotCon Eq. 1-8)."""
from __future__ import annotations

import copy

import pytest
import torch

from pretrain.losses import inverse_augment, self_distillation_loss, updated_center
from pretrain.methods import ModelConfig, build_method
from pretrain.methods.slotcon import SlotCon

torch.set_num_threads(1)
B, S = 4, 64


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16, **kw)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(B, 2, generator=g) * 0.4
    hi = 0.6 + torch.rand(B, 2, generator=g) * 0.4
    box1 = torch.cat([lo, hi], dim=1)
    box2 = torch.cat([1 - hi[:, :1], lo[:, 1:], 1 - lo[:, :1], hi[:, 1:]], dim=1)
    return {
        "view1": torch.randn(B, 3, S, S, generator=g),
        "view2": torch.randn(B, 3, S, S, generator=g),
        "box1": box1,
        "box2": box2,
        "flip1": torch.tensor([False, True, False, True]),
        "flip2": torch.tensor([True, True, False, False]),
        "skipped": torch.zeros(B, dtype=torch.int64),
        "index": torch.arange(B),
    }


def _model(seed: int = 0, **kw) -> SlotCon:
    torch.manual_seed(seed)
    m = build_method(_cfg(**kw))
    with torch.no_grad():
        m.center.copy_(torch.linspace(-0.1, 0.2, m.cfg.num_prototypes))
    return m


def test_forward_api_and_teacher_gets_no_gradient() -> None:
    m = _model()
    out = m(_batch())
    assert {"loss", "loss_group", "loss_slot", "active_slots", "entropy"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert out["loss"].item() == pytest.approx(0.5 * out["loss_group"].item() + 0.5 * out["loss_slot"].item(), rel=1e-6)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert 1 <= out["active_slots"].item() <= 8
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name.startswith("teacher_"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.teacher_backbone() is m.teacher_encoder
    assert any(k.startswith("teacher_encoder.layer4.") for k in m.state_dict())
    assert "center" in m.state_dict()
    a = m.assign(_batch()["view1"])
    assert a.shape == (B, 8, 2, 2) and torch.allclose(a.sum(1), torch.ones(B, 2, 2), atol=1e-5)


def test_unknown_method_and_missing_keys_are_named() -> None:
    with pytest.raises(ValueError, match="model.method"):
        build_method(ModelConfig(method="nope"))
    with pytest.raises(ValueError, match="model.grouping"):
        build_method(_cfg(grouping="nope"))
    batch = _batch()
    del batch["box2"]
    with pytest.raises(KeyError, match="box2"):
        _model()(batch)


def test_permuting_prototypes_leaves_loss_unchanged() -> None:
    m = _model()
    out = m(_batch())
    p = copy.deepcopy(_model())
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        p.prototypes.weight.copy_(p.prototypes.weight[perm])
        p.teacher_prototypes.weight.copy_(p.teacher_prototypes.weight[perm])
        p.center.copy_(p.center[perm])
    out_p = p(_batch())
    for key in ("loss_group", "loss_slot", "active_slots", "entropy"):
        assert out_p[key].item() == pytest.approx(out[key].item(), rel=1e-4), key
    assert torch.allclose(p.center, m.center[perm], atol=1e-6)


def test_swapping_views_leaves_loss_unchanged() -> None:
    batch = _batch()
    swapped = {**batch}
    for a, b in (("view1", "view2"), ("box1", "box2"), ("flip1", "flip2")):
        swapped[a], swapped[b] = batch[b], batch[a]
    out, out_s = _model()(batch), _model()(swapped)
    for key in ("loss", "loss_group", "loss_slot", "active_slots", "entropy"):
        assert out_s[key].item() == pytest.approx(out[key].item(), rel=1e-4), key
    assert out_s["active_slots_1"].item() == pytest.approx(out["active_slots_2"].item())


def test_grouping_uses_old_centre_then_updates_with_both_views() -> None:
    m = _model()
    batch = _batch()
    c0 = m.center.clone()
    ref = copy.deepcopy(m)
    out = m(batch)
    # Recompute Eq. 1-3 from the teacher and student outputs of an identical copy.
    with torch.no_grad():
        z = torch.cat([ref.projector(ref.encoder(batch["view1"])), ref.projector(ref.encoder(batch["view2"]))])
        zt = torch.cat([ref.teacher_projector(ref.teacher_encoder(batch["view1"])),
                        ref.teacher_projector(ref.teacher_encoder(batch["view2"]))])
        _, ls = ref.prototypes(z)
        _, lt = ref.teacher_prototypes(zt)
        boxes = torch.cat([batch["box1"], batch["box2"]])
        flips = torch.cat([batch["flip1"], batch["flip2"]])
        als, alt = inverse_augment(ls, boxes, flips), inverse_augment(lt, boxes, flips)
        expected = (self_distillation_loss(als[:B], alt[B:], c0, 0.1, 0.07)
                    + self_distillation_loss(als[B:], alt[:B], c0, 0.1, 0.07))
    assert out["loss_group"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(m.center, updated_center(c0, lt, 0.9), atol=1e-6)
    # ... and not with one view only.
    assert not torch.allclose(m.center, updated_center(c0, lt[:B], 0.9), atol=1e-4)
    # Eval-mode forward does not touch the centre.
    m.eval()
    c1 = m.center.clone()
    m(batch)
    assert torch.equal(m.center, c1)


def test_update_teacher_follows_student_and_teacher_bn_uses_batch_stats() -> None:
    m = _model()
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(0.5)
        m.prototypes.weight.mul_(2.0)
    t_before = m.teacher_encoder.conv1.weight.clone()
    proto_before = m.teacher_prototypes.weight.clone()
    m.update_teacher(0.75)
    assert torch.allclose(m.teacher_encoder.conv1.weight, 0.75 * t_before + 0.25 * m.encoder.conv1.weight)
    assert torch.allclose(m.teacher_prototypes.weight, 0.75 * proto_before + 0.25 * m.prototypes.weight)
    m.update_teacher(0.0)
    assert all(torch.equal(a, b) for a, b in zip(m.teacher_projector.parameters(), m.projector.parameters()))
    running = m.teacher_encoder.bn1.running_mean.clone()
    m(_batch())
    assert not torch.equal(m.teacher_encoder.bn1.running_mean, running)  # train mode: batch statistics


def test_channels_last_and_bfloat16_autocast() -> None:
    m = _model()
    ref = m(_batch())["loss"].item()
    m2 = _model().to(memory_format=torch.channels_last)
    batch = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v) for k, v in _batch().items()}
    assert m2(batch)["loss"].item() == pytest.approx(ref, rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _model()(_batch())
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(ref, rel=0.05)
