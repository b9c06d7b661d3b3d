"""Metrics of pretrain.eval.metrics on hand-made inputs whose answers are known."""
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pretrain.eval.metrics import (HungarianSegMeter, adjusted_rand_index, ari_fg, confusion_matrix,
                                   matched_iou, matched_scores, otsu_binarize)


def _scores(pred, gt, k, c):
    return matched_scores(confusion_matrix(torch.tensor(pred), torch.tensor(gt), k, c))


def test_permuted_perfect_prediction_scores_100():
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 5, (3, 16, 16), generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    meter = HungarianSegMeter(num_pred=5, num_classes=5)
    meter.update(perm[gt[:2]], gt[:2])  # accumulated over batches: one matching for the dataset
    meter.update(perm[gt[2:]], gt[2:])
    r = meter.compute()
    assert r["miou"] == pytest.approx(1.0) and r["pacc"] == pytest.approx(1.0)
    assert [r["mapping"][int(perm[c])] for c in range(5)] == list(range(5))


def test_constant_prediction():
    # class pixel counts 50 / 30 / 20; every pixel predicted as group 2
    gt = [0] * 50 + [1] * 30 + [2] * 20
    r = _scores([2] * 100, gt, 3, 3)
    # group 2 -> class 0: TP=50; IoU0 = 50/(100+50-50) = .5, IoU1 = IoU2 = 0
    assert r["pacc"] == pytest.approx(0.5)
    assert r["miou"] == pytest.approx(0.5 / 3)
    assert r["mapping"][2] == 0
    # many-to-one: unused groups map nowhere; same numbers as one-to-one here
    assert r["majority_mapping"] == [-1, -1, 0]
    assert r["miou_majority"] == pytest.approx(0.5 / 3) and r["pacc_majority"] == pytest.approx(0.5)


def test_more_groups_than_classes_unmatched_groups_are_wrong():
    gt = [0, 0, 0, 0, 1, 1, 1, 1]
    pred = [0, 0, 1, 1, 2, 2, 2, 3]
    r = _scores(pred, gt, 4, 2)
    assert r["pacc"] == pytest.approx(5 / 8)
    assert r["miou"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert sorted(m for m in r["mapping"] if m >= 0) == [0, 1] and r["mapping"][2] == 1
    # many-to-one: every group is pure, so the over-segmentation scores 100%
    assert r["majority_mapping"] == [0, 0, 1, 1]
    assert r["miou_majority"] == pytest.approx(1.0) and r["pacc_majority"] == pytest.approx(1.0)


def test_fewer_groups_than_classes_and_ignore_index():
    gt = [0, 0, 1, 1, 2, 2, 255, 255]
    pred = [0, 0, 1, 1, 1, 1, 0, 1]
    r = _scores(pred, gt, 2, 3)
    assert r["num_pixels"] == 6
    assert r["pacc"] == pytest.approx(4 / 6)
    assert r["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_out_of_range_labels_raise():
    with pytest.raises(ValueError, match="ground-truth labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 2, 3)


@pytest.mark.parametrize("seed", range(8))
def test_ari_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    a = rng.integers(0, rng.integers(1, 6), n)
    b = rng.integers(0, rng.integers(1, 9), n) if seed % 2 else (a * 3 + (rng.random(n) < 0.2)) % 5
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_ari_special_cases_match_sklearn():
    for a, b in [([0, 0, 0], [1, 1, 1]), ([0, 1, 2], [5, 6, 7]), ([0, 0, 1, 1], [0, 1, 0, 1]),
                 ([0, 0, 0, 0], [0, 1, 2, 3])]:
        assert adjusted_rand_index(np.array(a), np.array(b)) == pytest.approx(adjusted_rand_score(a, b))


def test_ari_fg_ignores_background():
    inst = torch.tensor([[[0, 0, 1, 1], [0, 0, 2, 2]]])
    # background pixels are predicted arbitrarily; foreground is a relabelled perfect split
    pred = torch.tensor([[[5, 1, 3, 3], [4, 2, 7, 7]]])
    assert ari_fg(inst, pred) == [1.0]
    pred_bad = torch.tensor([[[5, 1, 3, 7], [4, 2, 3, 7]]])
    fg = inst[0] != 0
    assert ari_fg(inst, pred_bad)[0] == pytest.approx(adjusted_rand_score(inst[0][fg], pred_bad[0][fg]))
    assert np.isnan(ari_fg(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))[0])


def test_otsu_recovers_bright_region_and_constant_is_empty():
    g = torch.Generator().manual_seed(1)
    m = 0.1 + 0.05 * torch.rand(2, 20, 20, generator=g)
    truth = torch.zeros(20, 20, dtype=torch.bool)
    truth[4:12, 6:15] = True
    m[0][truth] += 0.7
    m[1] = 0.3
    masks = otsu_binarize(m)
    assert masks.shape == (2, 20, 20) and masks.dtype == torch.bool
    assert torch.equal(masks[0], truth)
    assert not masks[1].any()


def test_matched_iou_on_constructed_masks():
    inst = torch.zeros(10, 10, dtype=torch.long)
    inst[0:4, 0:4] = 1  # 16 px
    inst[5:10, 5:9] = 2  # 20 px
    obj1 = inst == 1
    half2 = torch.zeros_like(obj1)
    half2[5:10, 5:7] = True  # 10 of object 2's 20 px -> IoU .5
    junk = torch.zeros_like(obj1)
    junk[0:10, 9] = True
    preds = torch.stack([junk, half2, obj1])
    assert matched_iou(preds, inst) == pytest.approx((1.0 + 0.5) / 2)
    # one mask for two objects: the unmatched object scores 0
    assert matched_iou(half2[None], inst) == pytest.approx(0.5 / 2)
    # the background is never matched: a mask equal to the background scores nothing
    assert matched_iou((inst == 0)[None], inst) == pytest.approx(0.0)
