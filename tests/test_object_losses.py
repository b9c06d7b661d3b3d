"""Hungarian matching, CTR-ALL / CTR-IMG / COSSIM object losses and the global loss (paper 000)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.losses.global_contrast import global_contrastive_loss, pool_slots
from pretrain.losses.object_losses import (
    cossim_loss,
    ctr_all_loss,
    ctr_img_loss,
    hungarian_match,
    match_slots,
    object_loss,
)

torch.set_num_threads(1)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_matching_recovers_a_permutation_exactly() -> None:
    b, s, d = 4, 7, 16
    x = _rand(b, s, d)
    perms = torch.stack([torch.randperm(s, generator=torch.Generator().manual_seed(i)) for i in range(b)])
    y = torch.stack([x[i, perms[i]] + 0.01 * _rand(s, d, seed=10 + i) for i in range(b)])
    sigma = match_slots(x, y)
    # y[b, j] = x[b, perm[b, j]]: slot i of x belongs to the j with perm[b, j] = i.
    assert torch.equal(sigma, perms.argsort(dim=1))
    assert torch.equal(torch.gather(perms, 1, sigma), torch.arange(s).expand(b, s))


def test_hungarian_beats_greedy_on_a_crafted_case() -> None:
    # Greedy row-wise argmax would give row 0 -> col 0 (0.9) and row 1 -> col 0 too; the optimal
    # one-to-one assignment is (0 -> 1, 1 -> 0) with total 0.8 + 0.85.
    sim = torch.tensor([[[0.9, 0.8], [0.85, 0.1]]])
    assert hungarian_match(sim).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.full((1, 2, 2), float("nan")))


def _manual_ctr(q: torch.Tensor, keys: torch.Tensor, pos: int, own: int, tau: float) -> float:
    """-log exp(cos(q, k_pos)/tau) / sum_{j != own} exp(cos(q, k_j)/tau)."""
    cos = F.cosine_similarity(q[None], keys, dim=-1) / tau
    mask = torch.ones(len(keys), dtype=torch.bool)
    mask[own] = False
    return float(-(cos[pos] - torch.logsumexp(cos[mask], dim=0)))


def test_ctr_all_and_ctr_img_match_the_formula_of_eq2() -> None:
    b, s, d, tau = 3, 4, 8, 0.2
    q1, q2, k1, k2 = (_rand(b, s, d, seed=i) for i in range(4))
    p12 = torch.stack([torch.randperm(s, generator=torch.Generator().manual_seed(20 + i)) for i in range(b)])
    p21 = p12.argsort(dim=1)
    la = ctr_all_loss(q1, q2, k1, k2, p12, p21, tau, reduction="none")
    li = ctr_img_loss(q1, q2, k1, k2, p12, p21, tau, reduction="none")
    assert la.shape == li.shape == (2, b, s)
    keys_all = torch.cat([k1.flatten(0, 1), k2.flatten(0, 1)])  # index a*B*S + b*S + i
    for bi in range(b):
        keys_img = torch.cat([k1[bi], k2[bi]])  # index a*S + i
        for i in range(s):
            j = int(p12[bi, i])
            assert la[0, bi, i].item() == pytest.approx(_manual_ctr(q1[bi, i], keys_all, b * s + bi * s + j, bi * s + i, tau), abs=1e-4)
            assert li[0, bi, i].item() == pytest.approx(_manual_ctr(q1[bi, i], keys_img, s + j, i, tau), abs=1e-4)
            j = int(p21[bi, i])
            assert la[1, bi, i].item() == pytest.approx(_manual_ctr(q2[bi, i], keys_all, bi * s + j, b * s + bi * s + i, tau), abs=1e-4)
            assert li[1, bi, i].item() == pytest.approx(_manual_ctr(q2[bi, i], keys_img, j, s + i, tau), abs=1e-4)


def test_ctr_img_never_uses_another_images_slots() -> None:
    b, s, d, tau = 3, 4, 8, 0.2
    q1, q2, k1, k2 = (_rand(b, s, d, seed=i) for i in range(4))
    ident = torch.arange(s).expand(b, s)
    k1.requires_grad_(True)
    k2.requires_grad_(True)
    loss = ctr_img_loss(q1, q2, k1, k2, ident, ident, tau, reduction="none")
    loss[:, 0].sum().backward()  # image 0's tokens only
    assert k1.grad[0].abs().sum() > 0 and k2.grad[0].abs().sum() > 0
    assert k1.grad[1:].abs().sum() == 0 and k2.grad[1:].abs().sum() == 0
    # Changing other images' keys leaves image 0's loss unchanged; under CTR-ALL it does not.
    k1b, k2b = k1.detach().clone(), k2.detach().clone()
    k1b[1:] = _rand(b - 1, s, d, seed=99)
    after_img = ctr_img_loss(q1, q2, k1b, k2b, ident, ident, tau, reduction="none")
    torch.testing.assert_close(after_img[:, 0], loss[:, 0].detach())
    before_all = ctr_all_loss(q1, q2, k1.detach(), k2.detach(), ident, ident, tau, reduction="none")
    after_all = ctr_all_loss(q1, q2, k1b, k2b, ident, ident, tau, reduction="none")
    assert not torch.allclose(before_all[:, 0], after_all[:, 0])


def test_cossim_gives_no_gradient_to_its_target_and_is_minus_cosine() -> None:
    b, s, d = 2, 3, 8
    q1, q2 = (_rand(b, s, d, seed=i).requires_grad_(True) for i in range(2))
    k1, k2 = (_rand(b, s, d, seed=10 + i).requires_grad_(True) for i in range(2))
    p12 = torch.tensor([[2, 0, 1], [1, 2, 0]])
    p21 = p12.argsort(dim=1)
    loss = cossim_loss(q1, q2, k1, k2, p12, p21)
    loss.backward()
    assert k1.grad is None and k2.grad is None
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    expected = -(F.cosine_similarity(q1, k2[torch.arange(b)[:, None], p12], dim=-1).sum()
                 + F.cosine_similarity(q2, k1[torch.arange(b)[:, None], p21], dim=-1).sum()) / (2 * b * s)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # A perfect match of identical tokens reaches the minimum -1.
    y = torch.gather(q1.detach(), 1, p21[..., None].expand(-1, -1, d))  # y[b, p12[b, i]] = q1[b, i]
    perfect = cossim_loss(q1, y, q1, y, p12, p21)
    assert perfect.item() == pytest.approx(-1.0, abs=1e-6)


def test_siamese_ctr_all_with_identical_views_prefers_the_match() -> None:
    # Keys equal to queries (the paper's siamese form): the query itself must be excluded, or the
    # loss of identical, well separated tokens could not approach its minimum.
    b, s, d, tau = 2, 3, 64, 0.05
    x = F.normalize(_rand(b, s, d), dim=-1) * 10
    ident = torch.arange(s).expand(b, s)
    loss = ctr_all_loss(x, x, x, x, ident, ident, tau)
    assert loss.item() < 0.05
    assert object_loss("ctr_img", x, x, x, x, ident, ident, tau).item() < 0.05
    with pytest.raises(ValueError, match="model.object_loss"):
        object_loss("triplet", x, x, x, x, ident, ident, tau)


def test_global_loss_is_simclr_eq1() -> None:
    b, d, tau = 4, 8, 0.5
    z1, z2 = _rand(b, d, seed=1), _rand(b, d, seed=2)
    loss = global_contrastive_loss(z1, z2, z1, z2, tau)
    # Reference NT-Xent: 2B inputs, positive = other view, denominator over the 2B - 1 others.
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b) + b, torch.arange(b)])
    assert loss.item() == pytest.approx(F.cross_entropy(sim, target).item(), abs=1e-5)
    assert loss.item() > 0 and math.isfinite(loss.item())
    torch.testing.assert_close(pool_slots(torch.ones(2, 3, 4) * torch.arange(3.0)[:, None]), torch.ones(2, 4))


def _two_rank_worker(rank: int, init_file: str, q1, q2, k1, k2, p12, p21, tau, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = slice(rank * 2, rank * 2 + 2)
        loss = ctr_all_loss(q1[half], q2[half], k1[half], k2[half], p12[half], p21[half], tau)
        glob = global_contrastive_loss(q1[half, 0], q2[half, 0], k1[half, 0], k2[half, 0], tau)
        torch.save(torch.stack([loss, glob]), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two gloo processes (imports torch twice)
def test_ctr_all_across_two_ranks_equals_one_process_over_the_global_batch(tmp_path) -> None:
    import torch.multiprocessing as mp

    b, s, d, tau = 4, 3, 8, 0.2
    q1, q2, k1, k2 = (_rand(b, s, d, seed=i) for i in range(4))
    p12 = torch.stack([torch.randperm(s, generator=torch.Generator().manual_seed(30 + i)) for i in range(b)])
    p21 = p12.argsort(dim=1)
    out = str(tmp_path / "loss")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), q1, q2, k1, k2, p12, p21, tau, out), nprocs=2)
    per_rank = torch.stack([torch.load(f"{out}.{r}") for r in range(2)])
    # DDP averages over ranks: the mean of the rank losses is the single-process loss of the global batch.
    full = ctr_all_loss(q1, q2, k1, k2, p12, p21, tau)
    full_glob = global_contrastive_loss(q1[:, 0], q2[:, 0], k1[:, 0], k2[:, 0], tau)
    assert per_rank[:, 0].mean().item() == pytest.approx(full.item(), abs=1e-5)
    assert per_rank[:, 1].mean().item() == pytest.approx(full_glob.item(), abs=1e-5)
