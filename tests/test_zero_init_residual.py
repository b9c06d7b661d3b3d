"""The paper configs zero-initialise the last BN gamma of every residual block, in student and teacher.

DESIGN.md, "SlotCon: facts of the published training recipe": the official ResNet does this for both
encoders; the teacher starts as a copy of the student.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from pretrain.config import load_config
from pretrain.methods import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
PAPER = ["slotcon_coco_r50_800ep", "slotcon_cocoplus_r50_800ep", "slotcon_imagenet_r50_100ep",
         "slotcon_imagenet_r50_200ep"]


def _last_bns(encoder: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    blocks = [m for m in encoder.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_set_zero_init_residual(name):
    assert load_config(CONFIGS / f"{name}.yaml").model.zero_init_residual is True


def test_default_stays_off():
    assert load_config(None).model.zero_init_residual is False


def test_built_slotcon_has_zero_last_gamma_in_student_and_teacher():
    torch.manual_seed(0)
    # One paper config stands for all four: their models differ only in K, which BN init does not see.
    method = build_method(load_config(CONFIGS / "slotcon_coco_r50_800ep.yaml").model)
    student, teacher = method.encoder, method.teacher_backbone()
    assert teacher is not student
    for enc in (student, teacher):
        bns = _last_bns(enc)
        assert len(bns) == 16  # ResNet-50: 3 + 4 + 6 + 3 bottlenecks
        assert all(torch.count_nonzero(bn.weight) == 0 for bn in bns)
        # Only the residual branch's last gamma: the stem, other BNs and the shortcuts start at 1.
        others = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d) and all(m is not b for b in bns)]
        assert others and all(torch.all(m.weight == 1) for m in others)
    s, t = student.state_dict(), teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)

    off = load_config(CONFIGS / "slotcon_coco_r50_800ep.yaml", ["model.zero_init_residual=false",
                                                                 "model.dim_hidden=64"]).model
    assert all(torch.all(bn.weight == 1) for bn in _last_bns(build_method(off).encoder))
