"""One registry per kind: a grouping module or a method added in one file works everywhere.

A grouping module defined here, with nothing else edited, trains under SlotCon and ObjGlobal; a
SlotCon-protocol-only module is refused by ObjGlobal; a method defined here gets the shared
teacher/student scaffolding. The import structure has no circles.
"""
from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pretrain.methods import GROUPINGS, METHODS, ModelConfig, build_method, register_grouping, register_method
from pretrain.methods.base import TeacherStudentMethod
from pretrain.models.grouping import GroupingModule, GroupingOutput, pixel_slot_cosine
from tests.test_family_methods import toy_batch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


class SoftKMeansGrouping(GroupingModule):
    """One soft k-means step on learnable centres: assignment softmax over slots of the scaled
    pixel-centre cosine, slots the assignment-weighted mean of the pixels."""

    def __init__(self, dim: int, num_slots: int) -> None:
        super().__init__()
        self.num_slots, self.dim_in, self.dim_slot = num_slots, dim, dim
        self.centres = nn.Parameter(torch.randn(num_slots, dim))
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, feats: Tensor, noise: Tensor | None = None) -> GroupingOutput:  # noqa: D102
        self.check_input(feats)
        hw = tuple(feats.shape[-2:])
        pixels = feats.flatten(2).transpose(1, 2)  # (B, N, D)
        centres = self.centres.expand(feats.shape[0], -1, -1)
        logits = self.scale * pixel_slot_cosine(pixels, centres, hw)
        assign = logits.softmax(dim=1)
        weights = assign.flatten(2) / assign.flatten(2).sum(dim=-1, keepdim=True)
        slots = torch.einsum("bsn,bnd->bsd", weights, pixels.float())
        return GroupingOutput(slots=slots, assign=assign, logits=logits,
                              similarity=pixel_slot_cosine(pixels, slots, hw))


class ProtocolOnlyGrouping(nn.Module):
    """SlotCon's ``z -> (slots, logits)`` protocol only, like its prototypes (no ``GroupingOutput``)."""

    def __init__(self, dim: int, num_slots: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_slots, dim))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        logits = torch.einsum("bdhw,kd->bkhw", nn.functional.normalize(z, dim=1),
                              nn.functional.normalize(self.weight, dim=1))
        slots = torch.einsum("bkhw,bdhw->bkd", logits.softmax(dim=1), z) / z.shape[-1] / z.shape[-2]
        return slots, logits


@pytest.fixture
def test_groupings() -> Iterator[None]:
    """Register the test grouping modules for one test only, so other tests see the real registry."""
    register_grouping("test_soft_kmeans")(lambda cfg, dim: SoftKMeansGrouping(dim, cfg.num_prototypes))
    register_grouping("test_protocol_only")(lambda cfg, dim: ProtocolOnlyGrouping(dim, cfg.num_prototypes))
    yield
    GROUPINGS.pop("test_soft_kmeans")
    GROUPINGS.pop("test_protocol_only")


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(arch="resnet18", num_prototypes=4, dim_hidden=32, dim_out=16, **kw)


def _one_step(method: nn.Module) -> dict[str, Tensor]:
    """Forward, backward and one optimiser step; returns the forward's outputs."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    method.update_teacher(0.9)
    out = method(toy_batch(b=4, size=64))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out


@pytest.mark.parametrize(("method_name", "part"), [("slotcon", "prototypes"), ("objglobal", "grouping")])
def test_grouping_registered_in_a_test_file_trains_under_every_method(
    test_groupings: None, method_name: str, part: str
) -> None:
    torch.manual_seed(0)
    method = build_method(_tiny(method=method_name, grouping="test_soft_kmeans")).train()
    student = getattr(method, part)
    # SlotCon sees it through its adapter; ObjGlobal uses the module itself.
    module = student.module if method_name == "slotcon" else student
    assert isinstance(module, SoftKMeansGrouping)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    out = _one_step(method)
    assert math.isfinite(out["loss"].item()) and out["loss"].item() != 0.0
    for n, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert not torch.equal(p.detach(), before[n]), f"{n} was not updated by the optimiser"
    # The teacher copies the new module and the EMA covers it: t <- m t + (1 - m) s.
    teacher = getattr(method, f"teacher_{part}")
    t_centres = (teacher.module if method_name == "slotcon" else teacher).centres
    assert not t_centres.requires_grad
    old = t_centres.detach().clone()
    method.update_teacher(0.5)
    torch.testing.assert_close(t_centres, 0.5 * old + 0.5 * module.centres.detach())


def test_test_groupings_are_gone_after_the_test() -> None:
    assert not any(name.startswith("test_") for name in GROUPINGS)
    assert {"prototypes", "slot_attention", "qsa", "softargmax"} <= set(GROUPINGS)


def test_slotcon_protocol_grouping_trains_under_slotcon_and_objglobal_refuses_it(test_groupings: None) -> None:
    torch.manual_seed(0)
    method = build_method(_tiny(method="slotcon", grouping="test_protocol_only")).train()
    assert isinstance(method.prototypes, ProtocolOnlyGrouping)  # no adapter: it already speaks SlotCon's protocol
    _one_step(method)
    assert method.prototypes.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"model\.grouping.*objglobal.*'test_protocol_only'"):
        build_method(_tiny(method="objglobal", grouping="test_protocol_only"))
    with pytest.raises(ValueError, match=r"model\.grouping.*'prototypes'.*SemanticGrouping"):
        build_method(_tiny(method="objglobal", grouping="prototypes"))


def test_a_name_registers_once_and_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_grouping("slot_attention")(lambda cfg, dim: None)
    with pytest.raises(ValueError, match="already registered"):
        register_method("slotcon")(lambda cfg: None)
    with pytest.raises(ValueError, match=r"model\.grouping: unknown grouping 'kmeans'.*'qsa'"):
        build_method(_tiny(grouping="kmeans"))
    with pytest.raises(ValueError, match=r"model\.method: unknown method 'byol'.*'objglobal'"):
        build_method(_tiny(method="byol"))


class _PooledBYOL(TeacherStudentMethod):
    """A method in one class: cosine of the student's pooled projection with the teacher's other view."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.head = nn.Linear(cfg.dim_out, cfg.dim_out)
        self.add_teachers("encoder", "projector")

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # noqa: D102
        v1, v2 = self.views(batch)
        p1, p2 = (self.head(self.student_dense(v).mean(dim=(2, 3))) for v in (v1, v2))
        with torch.no_grad():
            t1, t2 = (self.teacher_dense(v).mean(dim=(2, 3)) for v in (v1, v2))
        cos = nn.functional.cosine_similarity
        loss = -(cos(p1, t2).mean() + cos(p2, t1).mean())
        return {"loss": loss}


@pytest.fixture
def test_method() -> Iterator[None]:
    register_method("test_pooled_byol")(_PooledBYOL)
    yield
    METHODS.pop("test_pooled_byol")


def test_method_registered_in_a_test_file_gets_the_shared_scaffolding(test_method: None) -> None:
    torch.manual_seed(0)
    method = build_method(_tiny(method="test_pooled_byol")).train()
    assert method.teacher_backbone() is method.teacher_encoder
    assert all(not p.requires_grad for n, p in method.named_parameters() if n.startswith("teacher_"))
    _one_step(method)
    # The EMA follows exactly the parts named in add_teachers.
    assert [type(s).__name__ for _, s in method.ema_pairs()] == ["ResNetEncoder", "Projector"]
    before = method.teacher_encoder.conv1.weight.detach().clone()
    method.update_teacher(0.25)
    torch.testing.assert_close(method.teacher_encoder.conv1.weight,
                               0.25 * before + 0.75 * method.encoder.conv1.weight.detach())
    batch = toy_batch(b=2, size=64)
    del batch["view2"]
    with pytest.raises(KeyError, match=r"_PooledBYOL\.forward: batch lacks keys \['view2'\]"):
        method(batch)


def test_every_registered_grouping_builds_for_slotcon() -> None:
    for name in GROUPINGS:
        method = build_method(dataclasses.replace(_tiny(grouping=name), dim_hidden=8))
        slots, logits = method.prototypes(torch.randn(2, 16, 3, 3))
        assert slots.shape == (2, 4, 16) and logits.shape == (2, 4, 3, 3), name


# ---- import structure ----------------------------------------------------------------------------
def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Project modules ``path`` imports (absolute names), leaving out ``if TYPE_CHECKING`` blocks."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("pretrain")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_models_never_import_methods_and_the_two_loaders_never_import_each_other() -> None:
    for path in (ROOT / "pretrain" / "models").glob("*.py"):
        bad = {m for m in _imports(path, module_level_only=False) if m.startswith("pretrain.methods")}
        assert not bad, f"{path.name} imports {bad} (the grouping registry is pretrain.models.registry)"
    data = ROOT / "pretrain" / "data"
    assert not {m for m in _imports(data / "ffcv_loader.py", module_level_only=False) if m.startswith("pretrain.data.loader")
                and m != "pretrain.data.loader_base" and not m.startswith("pretrain.data.loader_base.")}
    # loader.py builds the FFCV loader on request (an optional dependency), inside build_pretrain_loader only.
    assert "pretrain.data.ffcv_loader" not in _imports(data / "loader.py", module_level_only=True)
    assert "pretrain.data.loader" not in _imports(data / "loader_base.py", module_level_only=False)


def _cycles(subpackages: tuple[str, ...], *, module_level_only: bool) -> list[str]:
    """The modules of ``pretrain/<subpackages>`` that lie on an import cycle among themselves.

    A package's ``__init__`` importing its own submodules is no edge (``m != n``): only module-to-module
    imports count, which is what fails at import time (or forces an import into a function) when circular.
    """
    paths = [p for sub in subpackages for p in (ROOT / "pretrain" / sub).glob("*.py")]
    names = {_module_name(p): p for p in paths}
    graph = {n: {m for m in _imports(p, module_level_only=module_level_only) if m in names and m != n}
             for n, p in names.items()}

    def on_cycle(start: str) -> bool:
        stack, seen = list(graph[start]), set()
        while stack:
            node = stack.pop()
            if node == start:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(graph[node])
        return False

    return sorted(n for n in graph if on_cycle(n))


def test_no_import_cycles() -> None:
    assert _cycles(("models", "methods", "data"), module_level_only=True) == []
    # Within models and within data not even an import deferred into a function closes a circle
    # (grouping.py once imported its concrete modules lazily because they import it for the base class).
    assert _cycles(("models",), module_level_only=False) == []
    assert _cycles(("data",), module_level_only=False) == []
