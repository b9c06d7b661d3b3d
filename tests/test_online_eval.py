"""Online evaluation during pretraining: known answers of the scorer, config checks, eval rows in
metrics.jsonl and TensorBoard, an unchanged training trajectory, two gloo ranks = one process, the curve."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.config import ConfigError, load_config
from pretrain.engine.distributed import free_port
from pretrain.eval.datasets import HeldOutSplit
from pretrain.eval.online import OnlineStats, accumulate, evaluate_online, evaluate_teacher, summarize
from tests._engine_common import make_toy, read_eval_rows, read_metrics, tiny_overrides

K, C = 4, 3


def _scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8x8 images: background (left half / top half), two objects of classes 1 and 2.
    Instance id == class id, so one labelling serves both ground truths. Class pixels: 64, 32, 32."""
    inst = torch.zeros(2, 8, 8, dtype=torch.long)
    inst[0, :, 4:6], inst[0, :, 6:8] = 1, 2
    inst[1, 4:, :4], inst[1, 4:, 4:] = 1, 2
    return inst.clone(), inst.clone()


def _score(groups: torch.Tensor | None = None, soft: torch.Tensor | None = None) -> dict:
    """Scores of a hard grouping ``(B,H,W)`` (as a one-hot assignment) or a soft ``(B,K,H,W)`` one,
    fed one image per call (so per-image values land at their own index)."""
    sem, inst = _scenes()
    a = soft if soft is not None else F.one_hot(groups, K).permute(0, 3, 1, 2).float()
    stats = OnlineStats(K, C, 2)
    for i in range(2):
        accumulate(stats, a[i:i + 1], sem[i:i + 1], inst[i:i + 1], torch.tensor([i]), (8, 8))
    return summarize(stats, True, True)


def test_assignment_equal_to_ground_truth_scores_perfectly():
    _, inst = _scenes()
    r = _score(inst)
    assert r["miou"] == 100.0 and r["pacc"] == 100.0 and r["ari_fg"] == 100.0 and r["mbo"] == 100.0
    # prototype health: group 3 never wins; one-hot assignments have zero entropy; 3 groups per image
    assert r["dead_prototypes"] == 1 and r["entropy"] == 0.0 and r["active_slots"] == 3.0
    assert r["num_images"] == 2


def test_permuted_assignment_scores_the_same():
    _, inst = _scenes()
    perm = torch.tensor([2, 0, 3, 1])
    r = _score(perm[inst])
    assert r["miou"] == 100.0 and r["pacc"] == 100.0 and r["ari_fg"] == 100.0 and r["mbo"] == 100.0
    assert r["dead_prototypes"] == 1 and r["active_slots"] == 3.0


def test_constant_assignment_known_values():
    _, inst = _scenes()
    r = _score(torch.zeros_like(inst))
    # group 0 matched to the background (64 of 128 pixels): IoU 64/128, the two object classes 0
    assert r["miou"] == pytest.approx(100.0 * 0.5 / 3) and r["pacc"] == pytest.approx(50.0)
    assert r["ari_fg"] == 0.0  # two objects in one group
    assert r["mbo"] == pytest.approx(25.0)  # each 16-pixel object against the 64-pixel image
    assert r["dead_prototypes"] == 3 and r["active_slots"] == 1.0 and r["entropy"] == 0.0


def test_merged_objects_known_values():
    _, inst = _scenes()
    r = _score(inst.clamp(max=1))  # both objects in group 1
    # g0 = background (IoU 1), g1 matched to one object class (32 of its 64 pixels: IoU 0.5), the other 0
    assert r["miou"] == pytest.approx(50.0) and r["pacc"] == pytest.approx(75.0)
    assert r["ari_fg"] == 0.0 and r["mbo"] == pytest.approx(50.0)
    assert r["dead_prototypes"] == 2 and r["active_slots"] == 2.0


def test_uniform_soft_assignment_has_entropy_ln_k():
    r = _score(soft=torch.full((2, K, 8, 8), 1.0 / K))
    assert r["entropy"] == pytest.approx(math.log(K), rel=1e-6)
    # ties go to the first group (argmax), so one group wins everything
    assert r["active_slots"] == 1.0 and r["dead_prototypes"] == K - 1


def test_split_without_masks_gives_prototype_health_only(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    ds = HeldOutSplit(tmp_path, resolution=16)
    assert len(ds) == 3 and not ds.has_semantic and not ds.has_instances
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and bool((item["semantic"] == 255).all())

    class Const(torch.nn.Module):
        def assign(self, images):
            a = torch.zeros(images.shape[0], K, 4, 4)
            a[:, 2] = 1.0
            return a

    r, pic = evaluate_online(Const(), ds, K, batch_size=2, picture_images=2)
    assert r == {"num_images": 3, "miou": None, "pacc": None, "ari_fg": None, "mbo": None,
                 "dead_prototypes": 3, "entropy": 0.0, "active_slots": 1.0}
    assert pic.shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------- config

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


def test_config_rejects_a_missing_split_naming_key_and_folder(toy, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"'eval\.split'.*nope does not exist"):
        load_config(None, tiny_overrides(toy, tmp_path / "r", **{"eval.every_epochs": 1, "eval.split": "nope"}))
    from pretrain.train import main

    code = main(tiny_overrides(toy, tmp_path / "r", **{"eval.at_end": True, "eval.split": str(tmp_path / "x")}))
    assert code == 64
    err = capsys.readouterr().err
    assert "'eval.split'" in err and str(tmp_path / "x") in err
    assert not (tmp_path / "r").exists()  # refused before anything was built
    # off: the split is not looked at; toy scenes still to be generated: not refused either
    load_config(None, tiny_overrides(toy, tmp_path / "r", **{"eval.split": "nope"}))
    load_config(None, tiny_overrides(tmp_path / "later", tmp_path / "r", **{"eval.every_epochs": 1}))


@pytest.mark.parametrize("key,value", [("eval.every_epochs", -1), ("eval.batch_size", 0), ("eval.max_images", -2),
                                       ("eval.resolution", 4), ("eval.split", "")])
def test_config_rejects_bad_values_naming_the_key(toy, tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, tiny_overrides(toy, tmp_path / "r", **{key: value}))


def test_eval_is_a_free_key_on_resume():
    from pretrain.engine.rundir import config_changes

    c = config_changes({"eval": {"every_epochs": 0}}, {"eval": {"every_epochs": 2}})
    assert not c.refused and [k for k, _, _ in c.free] == ["eval.every_epochs"]


def test_schedule_every_n_and_at_end_once_and_skipped_on_a_stop_request():
    from types import SimpleNamespace

    from pretrain.engine.eval_hook import OnlineEval

    hook = OnlineEval(tb=None, write_row=None)
    calls = []
    hook.evaluate = lambda: calls.append(hook.trainer.epoch)
    hook.trainer = t = SimpleNamespace(cfg=load_config(None, ["train.epochs=5", "optim.warmup_epochs=1",
                                                              "eval.every_epochs=2", "eval.at_end=true",
                                                              "data.root=/nonexistent/later"]),
                                       epoch=0, exit_status=None)
    for t.epoch in range(1, 6):
        hook.after_epoch()
    assert calls == [2, 4, 5]
    t.epoch, t.exit_status = 4, "preempted"
    hook.after_epoch()
    assert calls == [2, 4, 5]


# ----------------------------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    """The same 3-epoch run with evaluation after epochs 2 and 3 (every 2, at the end) and without."""
    from pretrain.train import run

    out = {}
    for name, extra in (("eval", {"eval.every_epochs": 2, "eval.at_end": True, "eval.num_images": 2}), ("plain", {})):
        d = tmp_path_factory.mktemp(name)
        cfg = load_config(None, tiny_overrides(toy, d, **{"train.epochs": 3, **extra}))
        out[name] = (cfg, run(cfg))
    return out


def test_eval_rows_at_the_right_epochs_apart_from_step_rows(runs):
    _, res = runs["eval"]
    rows = read_eval_rows(res.run_dir)
    assert sorted(rows) == [2, 3]  # epochs completed; epoch 3 once (at_end)
    assert [rows[e]["step"] for e in (2, 3)] == [8, 12]
    assert sorted(read_metrics(res.run_dir)) == list(range(12))  # no eval row among the step rows
    for r in rows.values():
        assert r["kind"] == "eval" and r["num_images"] == 4
        assert set(r) >= {"miou", "pacc", "ari_fg", "mbo", "dead_prototypes", "entropy", "active_slots", "seconds"}
    # strict JSON: NaN/Infinity would reach parse_constant
    for line in (res.run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    # the eval row of epoch 2 precedes the step rows of epoch 3 (written at the epoch's end)
    kinds = [json.loads(x).get("kind", "train") for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.index("eval") == 8


def test_eval_figures_equal_a_direct_evaluation_of_the_final_teacher(runs):
    from pretrain.eval.inference import load_method

    cfg, res = runs["eval"]
    method, _ = load_method(res.run_dir, torch.device("cpu"))
    ds = HeldOutSplit(Path(cfg.data.root) / "val2017")
    direct, _ = evaluate_teacher(method, ds, cfg.model.num_prototypes, batch_size=cfg.eval.batch_size)
    row = read_eval_rows(res.run_dir)[3]
    assert {k: row[k] for k in direct} == direct


def test_tensorboard_has_eval_scalars_and_picture(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, res = runs["eval"]
    ea = EventAccumulator(str(res.run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    rows = read_eval_rows(res.run_dir)
    for k in ("miou", "pacc", "ari_fg", "mbo", "dead_prototypes", "entropy", "active_slots"):
        assert [(e.step, e.value) for e in ea.Scalars(f"eval/{k}")] == [
            (ep, pytest.approx(rows[ep][k], rel=1e-6)) for ep in (2, 3)]
    assert [e.step for e in ea.Images("eval/assignments")] == [2, 3]


def test_training_trajectory_is_bit_identical_with_eval_on(runs):
    from pretrain.engine.checkpoint import load_checkpoint

    (_, a), (_, b) = runs["eval"], runs["plain"]
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    sa = load_checkpoint(a.run_dir / "checkpoints" / "ckpt_00000012.pth")
    sb = load_checkpoint(b.run_dir / "checkpoints" / "ckpt_00000012.pth")
    assert sa["model"].keys() == sb["model"].keys()
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    # and the RNG streams the run carries on with (Python, NumPy, torch)
    assert sa["rng"].keys() == sb["rng"].keys()
    for k, v in sa["rng"].items():
        assert torch.equal(v, sb["rng"][k]) if isinstance(v, torch.Tensor) else v == sb["rng"][k], k


def test_evaluation_leaves_rng_bn_modes_and_centre_untouched(toy):
    from pretrain.methods import ModelConfig, build_method

    torch.manual_seed(0)
    m = build_method(ModelConfig(arch="resnet18", num_prototypes=K, dim_hidden=32, dim_out=16))
    m.train()
    m.teacher_encoder.eval()  # a module in its own mode must come back in it
    with torch.no_grad():
        m.center.copy_(torch.linspace(-0.1, 0.2, K))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [mod.training for mod in m.modules()]
    random.seed(1)
    np.random.seed(2)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    r, _ = evaluate_teacher(m, HeldOutSplit(toy / "val2017"), K, batch_size=3)
    assert r["num_images"] == 4
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])
    assert [mod.training for mod in m.modules()] == modes
    after = m.state_dict()
    for k, v in before.items():  # BN running statistics, counters, centre, EMA teacher
        assert torch.equal(after[k], v), k


# ------------------------------------------------------------------------------------ two gloo ranks

def _rank_worker(rank: int, port: int, root: str, out: str) -> None:
    from pretrain.methods import ModelConfig, build_method

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **kw: (calls.append(t.numel()), real(t, *a, **kw))[1]
    try:
        torch.manual_seed(0)
        m = build_method(ModelConfig(arch="resnet18", num_prototypes=K, dim_hidden=32, dim_out=16))
        r, _ = evaluate_teacher(m, HeldOutSplit(Path(root) / "val2017"), K, batch_size=1, rank=rank, world_size=2)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"result": r, "all_reduces": calls}))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(toy, tmp_path):
    from pretrain.methods import ModelConfig, build_method

    mp.spawn(_rank_worker, args=(free_port(), str(toy), str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = build_method(ModelConfig(arch="resnet18", num_prototypes=K, dim_hidden=32, dim_out=16))
    single, _ = evaluate_teacher(m, HeldOutSplit(toy / "val2017"), K, batch_size=1)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["result"] == single  # bit for bit, on every rank
        assert len(got["all_reduces"]) == 1  # one all-reduce of everything


# -------------------------------------------------------------------------------------------- curve

def test_curve_png_from_eval_rows_with_random_init_line(tmp_path):
    from PIL import Image

    from pretrain.eval.curves import main

    rows = [{"step": 0, "epoch": 0, "loss": 3.0},
            {"kind": "eval", "epoch": 1, "step": 4, "miou": 20.0, "ari_fg": None},
            {"kind": "eval", "epoch": 2, "step": 8, "miou": 25.0, "ari_fg": 30.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "base.json").write_text(json.dumps({"miou": 10.0, "ari_fg": 12.0}))
    assert main([str(tmp_path), "--random-init-json", str(tmp_path / "base.json"), "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.format == "PNG" and im.size == (1000, 360)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main([str(tmp_path), "--out", str(tmp_path / "d.png")]) == 2 and not (tmp_path / "d.png").exists()


def test_curve_random_init_baseline_is_the_runs_initial_teacher(runs, tmp_path):
    from pretrain.eval.curves import main
    from pretrain.eval.inference import load_method

    cfg, res = runs["eval"]
    assert main([str(res.run_dir), "--random-init", "--device", "cpu", "--out", str(tmp_path / "c.png")]) == 0
    base = json.loads((tmp_path / "c_random_init.json").read_text())
    method, _ = load_method(res.run_dir, torch.device("cpu"), random_init=True)
    direct, _ = evaluate_teacher(method, HeldOutSplit(Path(cfg.data.root) / "val2017"), cfg.model.num_prototypes)
    assert base == direct
    assert (tmp_path / "c.png").is_file()
