"""SlotCon loss terms against explicit loops on tiny tensors (Eq. 1-7), plus geometry and EMA."""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from pretrain.losses import (
    active_mask,
    inverse_augment,
    self_distillation_loss,
    slot_contrastive_loss,
    updated_center,
)
from pretrain.models.encoder import build_encoder
from pretrain.models.heads import Predictor, Projector
from pretrain.models.prototypes import SemanticGrouping, attentive_pool, prototype_similarity
from pretrain.models.teacher import ema_update_, make_teacher, teacher_momentum

torch.set_num_threads(1)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# ---- Eq. 1-3 -----------------------------------------------------------------------------------

def test_self_distillation_matches_loops() -> None:
    g = torch.Generator().manual_seed(0)
    n, k, h, w = 2, 3, 2, 2
    s, t, c = torch.randn(n, k, h, w, generator=g), torch.randn(n, k, h, w, generator=g), torch.randn(k, generator=g)
    tau_s, tau_t = 0.1, 0.07
    total = 0.0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                q = _softmax([(float(t[b, kk, i, j]) - float(c[kk])) / tau_t for kk in range(k)])
                p = _softmax([float(s[b, kk, i, j]) / tau_s for kk in range(k)])
                total += -sum(q[kk] * math.log(p[kk]) for kk in range(k))
    expected = total / (n * h * w)
    got = self_distillation_loss(s, t, c, tau_s, tau_t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The centre matters (a zero centre gives another value) and the teacher gets no gradient.
    assert self_distillation_loss(s, t, torch.zeros(k), tau_s, tau_t).item() != pytest.approx(expected, rel=1e-3)
    s.requires_grad_(True), t.requires_grad_(True)
    self_distillation_loss(s, t, c, tau_s, tau_t).backward()
    assert t.grad is None and s.grad is not None


def test_center_update_matches_loop() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 2, 5, generator=g)
    c0 = torch.tensor([0.5, -0.2, 0.1])
    mean = [sum(float(logits[b, kk, i, j]) for b in range(4) for i in range(2) for j in range(5)) / 40 for kk in range(3)]
    expected = [0.9 * float(c0[kk]) + 0.1 * mean[kk] for kk in range(3)]
    assert updated_center(c0, logits, 0.9).tolist() == pytest.approx(expected, rel=1e-5)


def test_prototype_similarity_and_attentive_pool_match_loops() -> None:
    g = torch.Generator().manual_seed(2)
    b, d, h, w, k = 2, 4, 2, 3, 3
    z, protos = torch.randn(b, d, h, w, generator=g), torch.randn(k, d, generator=g)
    logits = prototype_similarity(z, protos)
    tau, eps = 0.07, 1e-6
    slots = attentive_pool(z, logits, tau, eps)
    for bb in range(b):
        attn = {}
        for i in range(h):
            for j in range(w):
                zv = z[bb, :, i, j]
                cos = [float(zv @ protos[kk] / (zv.norm() * protos[kk].norm())) for kk in range(k)]
                assert logits[bb, :, i, j].tolist() == pytest.approx(cos, abs=1e-5)
                for kk, a in enumerate(_softmax([x / tau for x in cos])):
                    attn[kk, i, j] = a + eps
        for kk in range(k):
            norm = sum(attn[kk, i, j] for i in range(h) for j in range(w))
            for dd in range(d):
                exp = sum(attn[kk, i, j] * float(z[bb, dd, i, j]) for i in range(h) for j in range(w)) / norm
                assert slots[bb, kk, dd].item() == pytest.approx(exp, rel=1e-4, abs=1e-5)


def test_grouping_module_uses_raw_projections_and_eps() -> None:
    # A prototype that owns no pixel gets the plain mean of z through the epsilon (recipe), not NaN.
    grouping = SemanticGrouping(2, 2, tau_pool=0.07)
    with torch.no_grad():
        grouping.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    z = torch.tensor([[3.0, 5.0], [0.1, 0.2]]).view(1, 2, 1, 2)  # both pixels close to prototype 0
    slots, _ = grouping(z)
    assert torch.isfinite(slots).all()
    assert slots[0, 0].tolist() == pytest.approx([4.0, 0.15], rel=1e-4)  # un-normalised mean


# ---- Eq. 5-7 -----------------------------------------------------------------------------------

def test_active_mask_matches_loop() -> None:
    logits = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(3))
    mask = active_mask(logits)
    for b in range(3):
        winners = {int(logits[b, :, i, j].argmax()) for i in range(2) for j in range(2)}
        assert mask[b].tolist() == [kk in winners for kk in range(5)]


def _slot_case(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    b, k, d = 2, 4, 3
    s, t = torch.randn(b, k, d, generator=g), torch.randn(b, k, d, generator=g)
    ms = torch.tensor([[True, True, False, True], [True, False, True, True]])
    mt = torch.tensor([[True, False, True, True], [False, True, True, True]])
    return s, t, ms, mt


def _slot_loss_loop(s, t, ms, mt, tau):
    b, k, _ = s.shape
    keys = [(bb, kk) for bb in range(b) for kk in range(k) if mt[bb, kk]]
    losses = []
    for bb in range(b):
        for kk in range(k):
            if not (ms[bb, kk] and mt[bb, kk]):
                continue
            q = s[bb, kk] / s[bb, kk].norm()
            sims = {key: float(q @ t[key] / t[key].norm()) / tau for key in keys}
            lse = math.log(sum(math.exp(v) for v in sims.values()))
            losses.append(lse - sims[bb, kk])
    return sum(losses) / len(losses) * 2 * tau


def test_slot_contrastive_matches_loop() -> None:
    s, t, ms, mt = _slot_case()
    tau = 0.2
    got = slot_contrastive_loss(s, t, ms, mt, lambda x: x, tau)
    assert got.item() == pytest.approx(_slot_loss_loop(s, t, ms, mt, tau), rel=1e-5)


def test_inactive_slots_are_neither_positive_nor_negative() -> None:
    s, t, ms, mt = _slot_case()
    base = slot_contrastive_loss(s, t, ms, mt, lambda x: x, 0.2).item()
    # Teacher slot (0, 1) is inactive: changing it changes nothing (not a negative).
    t2 = t.clone()
    t2[0, 1] = torch.tensor([9.0, -3.0, 4.0])
    assert slot_contrastive_loss(s, t2, ms, mt, lambda x: x, 0.2).item() == pytest.approx(base, rel=1e-6)
    # Student slot (0, 2) is inactive in the student view: not a query.
    s2 = s.clone()
    s2[0, 2] = torch.tensor([9.0, -3.0, 4.0])
    assert slot_contrastive_loss(s2, t, ms, mt, lambda x: x, 0.2).item() == pytest.approx(base, rel=1e-6)
    # Student slot (1, 0) is active but its teacher counterpart is not: not a query either.
    s3 = s.clone()
    s3[1, 0] = torch.tensor([9.0, -3.0, 4.0])
    assert slot_contrastive_loss(s3, t, ms, mt, lambda x: x, 0.2).item() == pytest.approx(base, rel=1e-6)
    # An active teacher slot does matter (control).
    t3 = t.clone()
    t3[1, 2] = torch.tensor([9.0, -3.0, 4.0])
    assert slot_contrastive_loss(s, t3, ms, mt, lambda x: x, 0.2).item() != pytest.approx(base, rel=1e-3)


def test_slot_contrastive_gradient_reaches_predictor_only_for_queries() -> None:
    s, t, ms, mt = _slot_case()
    s.requires_grad_(True)
    pred = Predictor(3, 8, 3)
    slot_contrastive_loss(s, t, ms, mt, pred, 0.2).backward()
    queried = (ms & mt)
    assert (s.grad.abs().sum(-1) > 0).eq(queried).all()
    assert all(p.grad is not None for p in pred.parameters())


# ---- inverse augmentation ----------------------------------------------------------------------

def _coordinate_image(size: int) -> torch.Tensor:
    """(2, S, S): channel 0 = x, channel 1 = y of each pixel centre, in [0, 1]."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.stack([c.view(1, -1).expand(size, size), c.view(-1, 1).expand(size, size)])


@pytest.mark.parametrize("codes", [(0, 1), (2, 0), (1, 3), (3, 2)])
def test_inverse_augment_aligns_views_on_their_overlap(codes: tuple[int, int]) -> None:
    """Flip codes: bit 0 horizontal, bit 1 vertical (docs/contracts.md)."""
    size, out = 64, 16
    image = _coordinate_image(size)
    crops = [(12, 8, 44, 40, codes[0]), (0, 20, 40, 42, codes[1])]  # (top, left, height, width, flip code), pixels
    inter = (20 / size, 12 / size, 48 / size, 40 / size)  # x1, y1, x2, y2 of the crops' overlap
    views, boxes, flips = [], [], []
    for top, left, hgt, wid, flip in crops:
        # Downscaling crops: bilinear resizing of a linear field is exact away from clamped borders.
        v = TF.resized_crop(image, top, left, hgt, wid, [out, out], antialias=False)
        X1, Y1, X2, Y2 = left / size, top / size, (left + wid) / size, (top + hgt) / size
        box = [(inter[0] - X1) / (X2 - X1), (inter[1] - Y1) / (Y2 - Y1), (inter[2] - X1) / (X2 - X1), (inter[3] - Y1) / (Y2 - Y1)]
        if flip & 1:  # a flip mirrors the view and its box (contract)
            v = v.flip(-1)
            box = [1 - box[2], box[1], 1 - box[0], box[3]]
        if flip & 2:
            v = v.flip(-2)
            box = [box[0], 1 - box[3], box[2], 1 - box[1]]
        views.append(v)
        boxes.append(box)
        flips.append(flip)
    maps = torch.stack(views)
    aligned = inverse_augment(maps, torch.tensor(boxes), torch.tensor(flips, dtype=torch.uint8))
    grid = (torch.arange(out, dtype=torch.float32) + 0.5) / out
    expected_x = (inter[0] + grid * (inter[2] - inter[0])).view(1, -1).expand(out, out)
    expected_y = (inter[1] + grid * (inter[3] - inter[1])).view(-1, 1).expand(out, out)
    expected = torch.stack([expected_x, expected_y])
    inner = (slice(None), slice(1, -1), slice(1, -1))  # RoIAlign clamps samples beyond the map edge
    for v in range(2):
        assert torch.allclose(aligned[v][inner], expected[inner], atol=1e-5), f"view {v + 1} misaligned"
        assert torch.allclose(aligned[v], expected, atol=1.0 / out)
    assert torch.allclose(aligned[0][inner], aligned[1][inner], atol=1e-5)
    # Without flipping back, a flipped view would disagree with the other.
    unflipped = inverse_augment(maps, torch.tensor(boxes), torch.zeros(2, dtype=torch.bool))
    for v in range(2):
        if codes[v]:
            assert not torch.allclose(unflipped[v][inner], expected[inner], atol=1e-2)
    # A bool flag is a horizontal flip (the older contract).
    if codes == (0, 1):
        as_bool = inverse_augment(maps, torch.tensor(boxes), torch.tensor([False, True]))
        assert torch.equal(as_bool, aligned)


def test_inverse_augment_full_box_is_identity() -> None:
    maps = torch.randn(3, 2, 5, 7)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    flips = torch.tensor([False, True, False])
    out = inverse_augment(maps, boxes, flips)
    assert torch.allclose(out[0], maps[0], atol=1e-6)
    assert torch.allclose(out[1], maps[1].flip(-1), atol=1e-6)


# ---- networks and teacher ----------------------------------------------------------------------

def test_encoder_keys_match_torchvision() -> None:
    enc = build_encoder("resnet18")
    tv = torchvision.models.resnet18().state_dict()
    assert set(enc.state_dict()) == set(tv) - {"fc.weight", "fc.bias"}
    assert enc.num_features == 512 and enc(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    zero = build_encoder("resnet18", zero_init_residual=True)
    assert zero.layer1[0].bn2.weight.abs().sum() == 0 and enc.layer1[0].bn2.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="model.arch"):
        build_encoder("resnet7")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_encoder_output_stride_options_keep_torchvision_keys(arch: str) -> None:
    tv = set(getattr(torchvision.models, arch)().state_dict()) - {"fc.weight", "fc.bias"}
    x = torch.zeros(1, 3, 64, 64)
    for stem_pool, last_stride, side in ((True, 2, 2), (False, 2, 4), (True, 1, 4), (False, 1, 8)):
        enc = build_encoder(arch, stem_pool=stem_pool, last_stride=last_stride)
        assert set(enc.state_dict()) == tv
        assert enc(x).shape[-2:] == (side, side), (stem_pool, last_stride)
    with pytest.raises(ValueError, match="last_stride"):
        build_encoder(arch, last_stride=4)


def test_heads_layout_and_init() -> None:
    proj, pred = Projector(64, 512, 32), Predictor(32, 512, 32)
    assert proj(torch.randn(2, 64, 3, 3)).shape == (2, 32, 3, 3)
    assert pred(torch.randn(5, 32)).shape == (5, 32)
    kinds = [type(m).__name__ for m in pred.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [type(m).__name__ for m in proj.mlp][::3] == ["Conv2d", "Conv2d", "Conv2d"]
    w = proj.mlp[3].weight
    # trunc_normal_(std=0.02) with DINO's absolute bounds (-2, 2): std 0.02, not PyTorch's default init.
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(m.bias.abs().sum() == 0 for m in list(proj.mlp)[::3] + list(pred.mlp)[::3])


@pytest.mark.parametrize("step,expected", [(0, 0.99), (500, 0.995), (1000, 1.0), (250, 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)])
def test_teacher_momentum_schedule(step: int, expected: float) -> None:
    assert teacher_momentum(step, 1000, 0.99) == pytest.approx(expected, abs=1e-12)


def test_ema_update_is_exact_and_teacher_frozen() -> None:
    student = torch.nn.Linear(3, 2)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher.parameters(), student.parameters(), 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s)


def test_logits_and_pooling_stay_float32_under_autocast() -> None:
    z, protos = torch.randn(2, 8, 3, 3), torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prototype_similarity(z.bfloat16(), protos)
        slots = attentive_pool(z.bfloat16(), logits, 0.07)
    assert logits.dtype == torch.float32 and slots.dtype == torch.float32
    assert torch.allclose(logits, prototype_similarity(z.bfloat16().float(), protos), atol=1e-6)


def test_single_query_with_plain_bn_gives_zero_not_error() -> None:
    s, t, ms, mt = _slot_case()
    only = torch.zeros_like(ms)
    only[0, 0] = True
    s.requires_grad_(True)
    loss = slot_contrastive_loss(s, t, only, mt, Predictor(3, 8, 3), 0.2)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable, zero gradient
    assert s.grad.abs().sum() == 0
