"""BYOL photometric augmentations: each op against torchvision, per-sample parameters, recipe."""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF

from pretrain.data.photometric import (_adjust_hue, _color_op, _gaussian_blur, apply_photometric, normalize,
                                       sample_photometric)

KW = dict(color_jitter=[0.4, 0.4, 0.2, 0.1], color_jitter_p=0.8, grayscale_p=0.2)


def _x(b=3, s=24, seed=0):
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_color_ops_match_torchvision():
    x = _x()
    f = torch.tensor([0.7, 1.2, 1.35])
    for op, ref in ((0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)):
        got = _color_op(x, op, f)
        want = torch.stack([ref(x[i], float(f[i])) for i in range(3)])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    h = torch.tensor([-0.1, 0.03, 0.08])
    want = torch.stack([TF.adjust_hue(x[i], float(h[i])) for i in range(3)])
    torch.testing.assert_close(_adjust_hue(x, h), want, atol=1e-4, rtol=0)


def test_blur_matches_torchvision():
    x = _x(b=2, s=40)
    sigma = torch.tensor([0.5, 1.7])
    got = _gaussian_blur(x, sigma)
    want = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2) for i in range(2)])
    # kernel: 10% of the side made odd, 5 taps at 40 (23 at 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_parameters_per_sample_and_recipe_rates():
    p = sample_photometric(1, 2, range(4000), 0, blur_p=1.0, solarize_p=0.0, **KW)
    assert abs(p["jitter"].float().mean() - 0.8) < 0.03 and abs(p["gray"].float().mean() - 0.2) < 0.03
    assert p["blur"].all() and not p["solarize"].any()
    assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
    assert p["factors"][:, 0].min() >= 0.6 and p["factors"][:, 0].max() <= 1.4
    assert p["factors"][:, 3].abs().max() <= 0.1
    assert (p["order"].sort(1).values == torch.arange(4)).all()  # a permutation of the 4 ops
    q = sample_photometric(1, 2, range(4000), 1, blur_p=0.1, solarize_p=0.2, **KW)
    assert abs(q["blur"].float().mean() - 0.1) < 0.03 and abs(q["solarize"].float().mean() - 0.2) < 0.03
    # a sample's parameters depend on (seed, epoch, index, view) only, not on its batch
    one = sample_photometric(1, 2, [17], 0, blur_p=1.0, solarize_p=0.0, **KW)
    for k in one:
        torch.testing.assert_close(one[k][0], p[k][17])


def test_apply_batch_equals_per_sample_and_solarize():
    x = _x(b=6, s=32)
    p = sample_photometric(0, 0, range(6), 1, blur_p=0.5, solarize_p=1.0, **KW)
    batch = apply_photometric(x, p)
    for i in range(6):
        single = apply_photometric(x[i:i + 1], {k: v[i:i + 1] for k, v in p.items()})
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=0)
    assert batch.min() >= 0 and batch.max() < 128 / 255  # solarised everywhere: nothing at or above 128/255
    off = {k: torch.zeros_like(v) if v.dtype == torch.bool else v for k, v in p.items()}
    torch.testing.assert_close(apply_photometric(x, off), x)
    n = normalize(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(n[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))


def test_opencv_cpu_implementation_matches_torch():
    """The CPU path (OpenCV per image) and the GPU path (torch batched) give the same views for
    the same parameters: every op incl. negative hue shifts, small-sigma blur and solarisation."""
    import numpy as np

    from pretrain.data.photometric_cpu import augment_image, params_numpy

    n, s = 48, 40
    imgs = np.random.default_rng(3).integers(0, 256, (n, s, s, 3), dtype=np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    for view, (blur_p, sol_p) in enumerate(((1.0, 0.0), (0.5, 1.0))):
        p = sample_photometric(5, 1, range(n), view, blur_p=blur_p, solarize_p=sol_p, **KW)
        assert (p["factors"][:, 3] < 0).any() and p["jitter"].any() and p["gray"].any()
        want = normalize(apply_photometric(x, p))
        out = np.full((n, 3, s, s), np.nan, np.float32)
        pn = params_numpy(p)
        for i in range(n):
            assert np.shares_memory(augment_image(imgs[i], pn, i, out=out[i]), out)
        got = torch.from_numpy(out)
        assert torch.isfinite(got).all()  # every plane written in place
        diff = (got - want).abs()
        # solarisation thresholds pixels at 128/255 in float32 on both sides; a pixel within
        # float rounding of it may flip (|1 - 2x| ~ 0.004 / std), nowhere else differs
        assert diff.mean() < 1e-5
        assert (diff > 1e-4).float().mean() < 1e-3
        if sol_p == 0.0:
            assert diff.max() < 1e-4
