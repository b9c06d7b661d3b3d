"""Prototype retrieval (SlotCon Sec. 4.6, Fig. 3): the top-5 segments nearest to each prototype.

Every image is grouped into non-overlapping segments (per-pixel argmax of the teacher assignment at
feature resolution); each segment's dense features are mean-pooled into one vector; for every
prototype the segments of highest cosine similarity to it are retrieved, over the whole dataset,
and drawn as a column of image tiles with the segment marked by a reddish mask.

Which features? A method may define ``retrieval_features(images) -> (features (B,D,h,w),
prototypes (K,D))`` (docs/contracts.md, optional evaluation hook). Otherwise a SlotCon-like method
(``teacher_encoder``, ``teacher_projector``, ``teacher_prototypes.weight``) gives the teacher's
dense projections and prototype vectors, the space where Eq. 1 compares them. Any other method falls
back to the assignment space itself: a segment's feature is its mean soft assignment and prototype
k is the k-th unit vector.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .inference import autocast_for, default_device, iterate_batches, make_loader
from .visualize import denormalize, save_png


@torch.no_grad()
def dense_features(method: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(features (B,D,h,w), prototypes (K,D), assignment (B,K,h,w))`` for retrieval (see module doc)."""
    hook = getattr(method, "retrieval_features", None)
    if callable(hook):
        feats, protos = hook(images)
        assign = method.assign(images)
    elif all(hasattr(method, n) for n in ("teacher_encoder", "teacher_projector", "teacher_prototypes")) \
            and hasattr(method.teacher_prototypes, "weight"):
        feats = method.teacher_projector(method.teacher_encoder(images))
        protos = method.teacher_prototypes.weight
        assign = method.assign(images)
    else:
        assign = method.assign(images)
        feats, protos = assign, torch.eye(assign.shape[1], device=assign.device)
    if feats.shape[-2:] != assign.shape[-2:]:
        feats = F.interpolate(feats.float(), size=assign.shape[-2:], mode="bilinear", align_corners=False)
    return feats.float(), protos.float(), assign.float()


def pool_segments(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean feature of every (image, group) segment present in a hard label map.

    Args:
        feats: ``(B,D,h,w)``; labels: ``(B,h,w)`` group per pixel.
    Returns:
        ``(pooled (N,D), image_in_batch (N,), group (N,))`` for the N segments present.
    """
    b, d = feats.shape[:2]
    k = int(labels.max()) + 1
    onehot = F.one_hot(labels.long(), k).permute(0, 3, 1, 2).float()  # (B,k,h,w)
    area = onehot.sum(dim=(2, 3))  # (B,k)
    sums = torch.einsum("bdhw,bkhw->bkd", feats, onehot)
    present = area > 0
    img, grp = present.nonzero(as_tuple=True)
    pooled = sums[img, grp] / area[img, grp].unsqueeze(1)
    return pooled, img, grp


@dataclass
class RetrievalResult:
    """Segments of the dataset and the top matches of every prototype."""

    seg_image: Tensor  # (N,) dataset index of each segment's image
    seg_group: Tensor  # (N,) group (prototype argmax id) of each segment
    top_index: Tensor  # (K,topk) segment indices, best first (-1 where fewer segments exist)
    top_score: Tensor  # (K,topk) cosine similarities
    label_maps: dict[int, Tensor]  # dataset index -> (h,w) group map, for the grids

    def to_json(self) -> dict:
        out = []
        for k in range(self.top_index.shape[0]):
            items = []
            for s, sc in zip(self.top_index[k].tolist(), self.top_score[k].tolist()):
                if s >= 0:
                    items.append({"image": int(self.seg_image[s]), "group": int(self.seg_group[s]),
                                  "cosine": float(sc)})
            out.append({"prototype": k, "segments": items})
        return {"num_segments": int(self.seg_image.numel()), "prototypes": out}


@torch.no_grad()
def retrieve_segments(method: nn.Module, dataset: Dataset, *, topk: int = 5, batch_size: int = 16,
                      num_workers: int = 0, device: torch.device | None = None, amp: bool = True,
                      progress: bool = True) -> RetrievalResult:
    """Group every image, pool each segment, and rank all segments by cosine similarity to each
    prototype (Sec. 4.6: "top 5 nearest-neighbor segments for each prototype according to cosine
    similarity"). A running top-k keeps memory independent of the dataset size."""
    device = device or default_device()
    method.eval()
    seg_image: list[Tensor] = []
    seg_group: list[Tensor] = []
    label_maps: dict[int, Tensor] = {}
    best_score: Tensor | None = None
    best_index: Tensor | None = None
    offset = 0
    for batch in iterate_batches(make_loader(dataset, batch_size, num_workers, device), "retrieval", progress):
        images = batch["image"].to(device, non_blocking=True)
        with autocast_for(device, amp):
            feats, protos, assign = dense_features(method, images)
        labels = assign.argmax(dim=1)
        pooled, img, grp = pool_segments(feats, labels)
        sim = F.normalize(pooled, dim=1) @ F.normalize(protos, dim=1).T  # (n, K)
        idx = torch.arange(offset, offset + sim.shape[0], device=device)
        offset += sim.shape[0]
        if best_score is None:
            k = protos.shape[0]
            best_score = torch.full((k, 0), float("-inf"), device=device)
            best_index = torch.zeros((k, 0), dtype=torch.long, device=device)
        cand_s = torch.cat([best_score, sim.T], dim=1)
        cand_i = torch.cat([best_index, idx.expand(sim.shape[1], -1)], dim=1)
        keep = min(topk, cand_s.shape[1])
        best_score, order = cand_s.topk(keep, dim=1)
        best_index = cand_i.gather(1, order)
        ds_index = batch["index"]
        seg_image.append(ds_index[img.cpu()])
        seg_group.append(grp.cpu())
        for j, di in enumerate(ds_index.tolist()):
            label_maps[di] = labels[j].to(torch.int16).cpu()
    if best_score is None:
        raise ValueError("retrieve_segments: empty dataset")
    k, have = best_score.shape
    top_i = torch.full((k, topk), -1, dtype=torch.long)
    top_s = torch.full((k, topk), float("nan"))
    top_i[:, :have] = best_index.cpu()
    top_s[:, :have] = best_score.cpu()
    return RetrievalResult(torch.cat(seg_image), torch.cat(seg_group), top_i, top_s, label_maps)


def _tile(dataset: Dataset, result: RetrievalResult, seg: int, tint: tuple[float, float, float]) -> Tensor:
    """One image with its segment tinted (reddish by default) and outlined, the rest dimmed."""
    di, g = int(result.seg_image[seg]), int(result.seg_group[seg])
    load = getattr(dataset, "load_image", None)
    image = load(di) if callable(load) else dataset[di]["image"]
    img = denormalize(image[None])[0]
    mask = (result.label_maps[di] == g).float()[None, None]
    # Bilinear then 0.5: smooth segment outlines instead of feature-resolution blocks.
    mask = (F.interpolate(mask, size=img.shape[-2:], mode="bilinear", align_corners=False) > 0.5)[0].float()
    color = torch.tensor(tint).view(3, 1, 1)
    out = torch.where(mask > 0, 0.45 * img + 0.55 * color, 0.5 * img)
    # white outline: the tint alone can be confused with red content of the image
    edge = (F.max_pool2d(mask[None], 3, 1, 1)[0] - mask) > 0
    return torch.where(edge, torch.ones_like(out), out)


def save_retrieval_grids(result: RetrievalResult, dataset: Dataset, out_dir: str | Path,
                         prototypes: list[int] | None = None, overview: int = 16,
                         tint: tuple[float, float, float] = (1.0, 0.15, 0.1)) -> dict:
    """Write ``proto_XXXX.png`` (the top segments of one prototype, a column best first, like
    Fig. 3), ``overview.png`` (columns of the first ``overview`` prototypes that won a segment) and
    ``retrieval.json``. Returns ``{"dir", "files", "overview"}``."""
    from torchvision.utils import make_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k, topk = result.top_index.shape
    protos = list(range(k)) if prototypes is None else list(prototypes)
    # Prototypes that are the argmax of at least one segment: the "used" ones worth showing first.
    used = sorted(set(result.seg_group.tolist()))
    files = []
    columns: dict[int, list[Tensor]] = {}
    for p in protos:
        segs = [s for s in result.top_index[p].tolist() if s >= 0]
        if not segs:
            continue
        tiles = [_tile(dataset, result, s, tint) for s in segs]
        columns[p] = tiles
        files.append(str(save_png(make_grid(torch.stack(tiles), nrow=1, padding=2, pad_value=1.0),
                                  out / f"proto_{p:04d}.png")))
    shown = [p for p in used if p in columns][:overview]
    ov = None
    if shown:
        # Row-major grid of topk rows x len(shown) columns: each column is one prototype.
        size = columns[shown[0]][0].shape
        blank = torch.ones(size)
        cells = [columns[p][r] if r < len(columns[p]) else blank for r in range(topk) for p in shown]
        ov = str(save_png(make_grid(torch.stack(cells), nrow=len(shown), padding=2, pad_value=1.0),
                          out / "overview.png"))
    (out / "retrieval.json").write_text(json.dumps(result.to_json(), indent=1))
    return {"dir": str(out), "files": files, "overview": ov, "overview_prototypes": shown}
