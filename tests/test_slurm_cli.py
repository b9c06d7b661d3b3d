"""Fast tests of the SLURM launcher without a cluster: dry run, parameters, collect, registry."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slurm import registry
from slurm.collect import collect, metrics_of
from slurm.options import Resources, executor_kwargs, sbatch_parameters
from slurm.published import SLOTCON, setting_of
from slurm.transfer import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """``python -m slurm ARGS`` in this process (fast); returns (returncode, stdout, stderr)."""
    from slurm.cli import main

    monkeypatch.chdir(REPO)

    def run(*args: str) -> subprocess.CompletedProcess:
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def test_dry_run_prints_sbatch_directives_and_config(tmp_path, run_cli):
    p = run_cli("pretrain", "configs/pretrain/slotcon_coco_r50_800ep.yaml", "--nodes", "4", "--gpus-per-node", "8",
                "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "4320", "--constraint", "a100",
                "--mem-per-gpu", "64", "--cpus-per-task", "10", "--exclude", "node[07-08]", "--signal-delay", "180",
                "--output-root", str(tmp_path), "--dry-run", "optim.base_lr=0.5")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", out, flags=re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "8" and directives["gpus-per-node"] == "8"
    assert directives["partition"] == "gpu" and directives["account"] == "proj" and directives["qos"] == "high"
    assert directives["time"] == "4320" and directives["constraint"] == "a100" and directives["mem-per-gpu"] == "64G"
    assert directives["cpus-per-task"] == "10" and directives["exclude"] == "'node[07-08]'"
    assert directives["job-name"] == "slotcon_coco_r50_800ep"  # the run's name by default
    assert directives["signal"] == "USR2@180"  # submitit's preemption signal, 180 s before the limit
    assert "requeue" in directives and directives["open-mode"] == "append"
    assert f"{tmp_path}/submitit/%j_%t_log.out" in out  # per-rank logs
    assert "srun" in out and "submitit.core._submit" in out
    # the resolved config, with the override applied and the job-id-named run dir
    assert "base_lr: 0.5" in out and f"run_dir: {tmp_path}/slotcon_coco_r50_800ep_<JOBID>" in out
    assert not (tmp_path / "submitit").exists()  # nothing submitted, nothing written


def test_dry_run_cpu_cluster_has_no_gres_and_bad_key_fails(tmp_path, run_cli):
    p = run_cli("pretrain", "configs/pretrain/demo_cpu.yaml", "--nodes", "2", "--tasks-per-node", "2",
                "--output-root", str(tmp_path), "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --ntasks-per-node=2" in p.stdout and "#SBATCH --nodes=2" in p.stdout
    sbatch = "\n".join(x for x in p.stdout.splitlines() if x.startswith("#SBATCH"))
    assert "gpus" not in sbatch and "gres" not in sbatch
    bad = run_cli("pretrain", "configs/pretrain/demo_cpu.yaml", "--output-root", str(tmp_path), "--dry-run",
                  "optim.bsae_lr=1")
    assert bad.returncode != 0 and "bsae_lr" in bad.stderr  # a typo fails before anything is queued


def test_resources_validation_and_translation():
    with pytest.raises(ValueError, match="one task per GPU"):
        Resources(gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ValueError, match="--nodes 1"):
        Resources(nodes=2, cluster="local")
    r = Resources(nodes=3, gpus_per_node=4, dependency="afterok:42", max_requeues=5, job_name="slotcon")
    kw = executor_kwargs(r)
    assert kw["tasks_per_node"] == 4 and kw["gpus_per_node"] == 4 and r.world_size == 12
    assert kw["slurm_additional_parameters"]["dependency"] == "afterok:42"
    native = sbatch_parameters(r)
    assert native["ntasks_per_node"] == 4 and native["time"] == r.time_min and native["job_name"] == "slotcon"
    det = Resources(nodes=2, gpus_per_node=8, task_per_node=True)  # Detectron2 spawns its own per-GPU processes
    assert det.ntasks_per_node == 1 and det.world_size == 2


def test_published_numbers_from_the_paper():
    # Table 2 (COCO, 800 ep) and Table 3 (ImageNet 100/200 ep) of SlotCon.
    assert SLOTCON["coco_800ep"] == {"AP_b": 41.0, "AP_m": 37.0, "mIoU_cityscapes": 76.2, "mIoU_voc": 71.6,
                                     "mIoU_ade20k": 39.0}
    assert SLOTCON["imagenet_200ep"]["AP_b"] == 41.8 and SLOTCON["imagenet_100ep"]["mIoU_voc"] == 73.1
    assert setting_of("configs/pretrain/slotcon_imagenet_r50_100ep.yaml") == "imagenet_100ep"
    assert setting_of("configs/pretrain/slotcon_cocoplus_r50_800ep.yaml") == "cocoplus_800ep"
    assert setting_of("configs/pretrain/demo_cpu.yaml") is None


def _fake_run(tmp_path: Path, config: str) -> Path:
    run_dir = tmp_path / "run_7"
    folder = tmp_path / "submitit"
    registry.add_job(run_dir, kind="pretrain", job_id="7", name="x", cluster="slurm", submitit_folder=folder,
                     num_tasks=2, extra={"config": config})
    values = {"det": {"bbox": {"AP": 40.25, "AP50": 60.0}, "segm": {"AP": 36.5}},
              "voc": {"metrics": {"mIoU": 70.5, "aAcc": 93.0}},
              "cityscapes": {"metrics": {"mIoU": 0.755}},  # a fraction: reported in percent
              "ade20k": None}  # job submitted, no metrics yet
    for i, (task, rec) in enumerate(values.items()):
        path = run_dir / "transfer" / task / "metrics.json"
        if rec is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
        registry.add_job(run_dir, kind="transfer", job_id=str(10 + i), name=task, cluster="slurm",
                         submitit_folder=folder, num_tasks=1, dependency="afterok:7",
                         extra={"task": task, "metrics": str(path)})
    return run_dir


def test_collect_builds_table_from_metrics_files(tmp_path, run_cli):
    run_dir = _fake_run(tmp_path, "/x/configs/pretrain/slotcon_coco_r50_800ep.yaml")
    md, data = collect(run_dir)
    assert data["setting"] == "coco_800ep"
    assert data["this_run"] == {"AP_b": 40.25, "AP_m": 36.5, "mIoU_cityscapes": pytest.approx(75.5),
                                "mIoU_voc": 70.5, "mIoU_ade20k": None}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["this run"] == ["40.2", "36.5", "75.5", "70.5", "–"]
    assert rows["SlotCon coco 800ep (published)"] == ["41.0", "37.0", "76.2", "71.6", "39.0"]
    assert rows["difference"] == ["-0.8", "-0.5", "-0.7", "-1.1", "–"]
    assert "ade20k (job 13): no metrics yet" in md
    assert json.loads((run_dir / "results.json").read_text())["this_run"]["AP_b"] == 40.25
    assert (run_dir / "results.md").read_text() == md
    p = run_cli("collect", str(run_dir))
    assert p.returncode == 0 and "| this run | 40.2 | 36.5 |" in p.stdout


def test_collect_without_known_setting_lists_every_published_row(tmp_path):
    md, data = collect(_fake_run(tmp_path, "/x/configs/pretrain/demo_cpu.yaml"))
    assert data["setting"] is None and set(data["published"]) == set(SLOTCON)
    assert md.count("(published)") == len(SLOTCON) and "difference" not in md


def test_metrics_of_flat_and_nested():
    assert metrics_of("det", {"AP_b": 1.5, "AP_m": 2.5}) == {"AP_b": 1.5, "AP_m": 2.5}
    assert metrics_of("ade20k", {"mIoU": 38.0}) == {"mIoU_ade20k": 38.0}


def test_resolve_checkpoint_prefers_exported_backbone_then_newest(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for s in (4, 12, 8):
        (ck / f"ckpt_{s:08d}.pth").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "ckpt_00000012.pth"
    (tmp_path / "teacher_backbone.pth").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path).name == "teacher_backbone.pth"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no teacher_backbone.pth or ckpt_"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a run directory"):
        resolve_checkpoint(tmp_path / "missing")


def test_status_without_registry_is_a_clear_error(tmp_path):
    # the real entry point, as a user runs it
    p = subprocess.run([sys.executable, "-m", "slurm", "status", str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 2 and "jobs.json" in p.stderr and "not a run directory" in p.stderr


class _Env:  # the parts of submitit.JobEnvironment that TransferJob.command reads
    def __init__(self, num_nodes: int, node: int, num_tasks: int) -> None:
        self.num_nodes, self.node, self.num_tasks = num_nodes, node, num_tasks


def test_transfer_command_lines(tmp_path, monkeypatch):
    from slurm.transfer import TransferJob

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    det = TransferJob("det", str(tmp_path), str(tmp_path), data_root="/data/coco", gpus_per_node=8)
    cmd = det.command(Path("/w/b.pkl"), _Env(num_nodes=2, node=1, num_tasks=2))
    assert cmd[1:3] == ["-m", "transfer.detection"] and cmd[cmd.index("--config") + 1].endswith(
        "configs/detection/mask_rcnn_R50_FPN_1x_syncbn.yaml")
    for flag, value in (("--weights", "/w/b.pkl"), ("--num-gpus", "8"), ("--num-machines", "2"),
                        ("--machine-rank", "1"), ("--dist-url", "tcp://10.0.0.1:29500"), ("--data-root", "/data/coco"),
                        ("--output-dir", str(tmp_path / "transfer" / "det"))):
        assert cmd[cmd.index(flag) + 1] == value
    seg = TransferJob("ade20k", str(tmp_path), str(tmp_path), opts=["train_cfg.max_iters=10"])
    seg.resume = True  # as set by checkpoint() before a requeue
    cmd = seg.command(Path("/w/b.pth"), _Env(num_nodes=1, node=0, num_tasks=8))
    assert cmd[1:3] == ["-m", "transfer.segmentation"] and cmd[cmd.index("--launcher") + 1] == "pytorch"
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / "transfer" / "ade20k")
    assert "--resume" in cmd and cmd[-1] == "train_cfg.max_iters=10"
    with pytest.raises(ValueError, match="unknown transfer task"):
        TransferJob("imagenet_linear", str(tmp_path), str(tmp_path))
