"""Evaluation loops on fake methods whose right answers are known: unsup_seg with an oracle,
discovery with an oracle, and retrieval with planted nearest segments."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.eval.discovery import evaluate_discovery
from pretrain.eval.retrieval import pool_segments, retrieve_segments, save_retrieval_grids
from pretrain.eval.unsup_seg import evaluate_unsup_seg

torch.set_num_threads(1)


class BlockDataset(torch.utils.data.Dataset):
    """16x16 images whose channel 0 holds the pixel's class (constant on 4x4 blocks)."""

    def __init__(self, n=5, num_classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
        self.num_classes = num_classes
        self.class_names = [f"c{i}" for i in range(num_classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.zeros(3, 16, 16)
        img[0] = self.labels[i].float()
        return {"image": img, "label": self.labels[i], "index": i}


class Oracle(nn.Module):
    """assign = one-hot of a permuted class, at ``stride`` (a backbone's lower resolution)."""

    def __init__(self, perm, k, stride=1):
        super().__init__()
        self.perm, self.k, self.stride = torch.tensor(perm), k, stride

    def assign(self, images):
        lab = self.perm[images[:, 0].round().long()]
        return F.avg_pool2d(F.one_hot(lab, self.k).permute(0, 3, 1, 2).float(), self.stride)


def test_unsup_seg_oracle_and_extra_groups():
    ds = BlockDataset()
    r = evaluate_unsup_seg(Oracle([2, 0, 3, 1], 4), ds, batch_size=2, device=torch.device("cpu"), progress=False)
    assert r["miou"] == pytest.approx(100.0) and r["pacc"] == pytest.approx(100.0)
    assert r["num_pixels"] == 5 * 256 and r["num_prototypes"] == 4
    # classes 0 and 1 merged into one group; K = 6 > C with unused groups
    merged = evaluate_unsup_seg(Oracle([5, 5, 0, 2], 6), ds, batch_size=3, device=torch.device("cpu"), progress=False)
    counts = torch.bincount(ds.labels.flatten(), minlength=4).double()
    big = int(counts[:2].argmax())
    iou_big = counts[big] / (counts[0] + counts[1])
    assert merged["pacc"] == pytest.approx(100 * float((counts[big] + counts[2] + counts[3]) / counts.sum()))
    assert merged["miou"] == pytest.approx(100 * float((iou_big + 0 + 1 + 1) / 4))
    assert merged["used_prototypes"] == 3
    # at stride 4 the soft map is upsampled bilinearly before the argmax: only pixels at block
    # corners (where two equal neighbours outvote the own block) can change
    coarse = evaluate_unsup_seg(Oracle([2, 0, 3, 1], 4, stride=4), ds, device=torch.device("cpu"), progress=False)
    assert 85.0 < coarse["pacc"] < 100.0


def test_discovery_oracle_is_perfect():
    ds = BlockDataset(n=3, num_classes=5, seed=3)  # labels as instance ids, 0 = background
    r = evaluate_discovery(Oracle([0, 1, 2, 3, 4], 5), ds, batch_size=2, device=torch.device("cpu"), progress=False)
    assert r["ari_fg"] == pytest.approx(100.0) and r["miou_otsu"] == pytest.approx(100.0)
    assert r["num_images"] == 3


class HalfDataset(torch.utils.data.Dataset):
    """8x8 images whose two halves are constant 3-vectors (the features of two segments)."""

    def __init__(self, vecs):
        self.vecs = vecs  # (N, 2, 3)

    def __len__(self):
        return len(self.vecs)

    def __getitem__(self, i):
        img = torch.empty(3, 8, 8)
        img[:, :, :4] = self.vecs[i, 0].view(3, 1, 1)
        img[:, :, 4:] = self.vecs[i, 1].view(3, 1, 1)
        return {"image": img, "label": torch.zeros(8, 8, dtype=torch.long), "index": i}


class HalfMethod(nn.Module):
    """Groups: left half -> 0, right half -> 1; features = the image; 3 prototypes."""

    def __init__(self, protos):
        super().__init__()
        self.protos = protos

    def assign(self, images):
        a = torch.zeros(images.shape[0], 3, 8, 8)
        a[:, 0, :, :4] = 1
        a[:, 1, :, 4:] = 1
        return a

    def retrieval_features(self, images):
        return images, self.protos


def test_retrieval_finds_planted_segments(tmp_path):
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 3, generator=g)
    vecs = torch.randn(7, 2, 3, generator=g)
    vecs[4, 1] = 2.5 * protos[2]  # planted: image 4's right segment points exactly at prototype 2
    vecs[2, 0] = protos[0] + 0.01  # planted: image 2's left segment almost at prototype 0
    ds = HalfDataset(vecs)
    res = retrieve_segments(HalfMethod(protos), ds, topk=5, batch_size=3, device=torch.device("cpu"), progress=False)
    assert res.seg_image.numel() == 14
    top2 = res.top_index[2, 0]
    assert (int(res.seg_image[top2]), int(res.seg_group[top2])) == (4, 1)
    assert float(res.top_score[2, 0]) == pytest.approx(1.0, abs=1e-5)
    top0 = res.top_index[0, 0]
    assert (int(res.seg_image[top0]), int(res.seg_group[top0])) == (2, 0)
    # the whole ranking agrees with brute force over all 14 segments
    feats = F.normalize(vecs.reshape(14, 3), dim=1)
    sims = feats @ F.normalize(protos, dim=1).T  # segment order: image-major, group-minor
    for k in range(3):
        want = sims[:, k].topk(5).indices.tolist()
        got = [int(res.seg_image[s]) * 2 + int(res.seg_group[s]) for s in res.top_index[k].tolist()]
        assert got == want
    files = save_retrieval_grids(res, ds, tmp_path / "grids")
    assert len(files["files"]) == 3 and (tmp_path / "grids" / "overview.png").is_file()
    assert files["overview_prototypes"] == [0, 1]  # prototype 2 is never any pixel's argmax


def test_pool_segments_means():
    feats = torch.arange(2 * 2 * 4, dtype=torch.float).view(2, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 1]], [[2, 2], [2, 2]]])
    pooled, img, grp = pool_segments(feats, labels)
    assert img.tolist() == [0, 0, 1] and grp.tolist() == [0, 1, 2]
    assert pooled[0].tolist() == [0.5, 4.5] and pooled[2].tolist() == [9.5, 13.5]


def test_hard_labels_chunked_equals_full_upsampling():
    from pretrain.eval.visualize import hard_labels

    a = torch.randn(2, 150, 5, 7, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(a, size=(33, 41), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(hard_labels(a, (33, 41), chunk=16), ref)
    assert torch.equal(hard_labels(a, (33, 41), chunk=150), ref)
