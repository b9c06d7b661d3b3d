"""Each configured method of the object-centric family trains on toy-scenes-like batches on CPU."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.methods import ModelConfig, build_method

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


def toy_batch(b: int = 4, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch in the contract format: flat backgrounds with a few coloured rectangles (like the
    toy scenes), view 2 a noisy copy of view 1, full-image intersection boxes, no flips."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(b, 3, 1, 1, generator=g).expand(b, 3, size, size).clone()
    for i in range(b):
        for _ in range(3):
            y, x = torch.randint(0, size - 16, (2,), generator=g).tolist()
            hh, ww = torch.randint(8, 16, (2,), generator=g).tolist()
            imgs[i, :, y : y + hh, x : x + ww] = torch.rand(3, 1, 1, generator=g)
    v1 = (imgs - 0.45) / 0.225
    v2 = v1 + 0.1 * torch.randn(v1.shape, generator=g)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b)
    return {
        "view1": v1, "view2": v2, "box1": full, "box2": full.clone(),
        "flip1": torch.zeros(b, dtype=torch.bool), "flip2": torch.zeros(b, dtype=torch.bool),
        "skipped": torch.zeros(b, dtype=torch.long), "index": torch.arange(b),
    }


def tiny(cfg: ModelConfig) -> ModelConfig:
    """The config's method at test size: ResNet-18, small heads, 4 slots, 2 iterations."""
    return dataclasses.replace(cfg, arch="resnet18", num_prototypes=4, dim_hidden=64, dim_out=32, slot_iters=2)


CASES = [
    ("objglobal_slot_attention_demo", "ctr_img"),
    ("objglobal_qsa_demo", "ctr_all"),
    ("objglobal_softargmax_demo", "cossim"),
    ("slotcon_slot_attention_demo", None),
    ("slotcon_qsa_demo", None),
]


@pytest.mark.parametrize(("config", "object_loss"), CASES)
def test_configured_method_trains_with_finite_decreasing_loss(config: str, object_loss: str | None) -> None:
    model_cfg = load_config(CONFIGS / f"{config}.yaml").model
    if object_loss is not None:
        model_cfg = dataclasses.replace(model_cfg, object_loss=object_loss)
    torch.manual_seed(0)
    method = build_method(tiny(model_cfg)).train()
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    batch = toy_batch()
    losses = []
    for _ in range(8):
        torch.manual_seed(100)  # same batch and same slot-initialisation draw every step
        method.update_teacher(0.99)
        out = method(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 and losses[-1] < losses[0], losses
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert 1.0 <= out["active_slots"].item() <= 4.0

    # Method API: assignment over slots, exportable teacher backbone.
    a = method.assign(batch["view1"])
    assert a.shape == (4, 4, 2, 2)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(4, 2, 2))
    torch.testing.assert_close(method.assign(batch["view1"]), a)  # reproducible pictures
    assert (a.max(dim=1).values - a.min(dim=1).values).max() > 1e-4  # slots are not all identical
    backbone = method.teacher_backbone().state_dict()
    assert "conv1.weight" in backbone and not any(k.startswith("fc.") for k in backbone)
    assert any(k.startswith("teacher_encoder.layer4.") for k in method.state_dict())


def test_objglobal_teacher_follows_ema_and_student_gets_all_gradients() -> None:
    cfg = tiny(ModelConfig(method="objglobal", grouping="qsa", object_loss="ctr_img"))
    torch.manual_seed(0)
    method = build_method(cfg).train()
    out = method(toy_batch())
    out["loss"].backward()
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(not p.requires_grad for n, p in method.named_parameters() if n.startswith("teacher_"))
    # EMA: t <- m t + (1 - m) s.
    with torch.no_grad():
        method.grouping.queries.add_(1.0)
    before = method.teacher_grouping.queries.clone()
    method.update_teacher(0.9)
    torch.testing.assert_close(method.teacher_grouping.queries, 0.9 * before + 0.1 * method.grouping.queries)


def test_objglobal_rejects_prototypes_and_unknown_losses() -> None:
    with pytest.raises(ValueError, match="model.grouping"):
        build_method(tiny(ModelConfig(method="objglobal", grouping="prototypes")))
    with pytest.raises(ValueError, match="model.object_loss"):
        build_method(tiny(ModelConfig(method="objglobal", grouping="qsa", object_loss="triplet")))
