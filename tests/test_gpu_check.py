"""``tools/gpu_check.py --cpu-dry-run``: the GPU check's whole sequence at tiny sizes on the CPU.

The GPU run cannot be tested here; the dry run executes the same checks (training through
``pretrain.train.run``, the photometric comparison, compile, resume, FFCV) so that the script keeps
working with the code it exercises. The BENCHMARKS.md updater replaces its own section only.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._engine_common import REPO, child_env

sys.path.insert(0, str(REPO))

from tools.gpu_check import BENCH_SECTION, update_benchmarks  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu-dry-run", "--out-dir", str(out)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=1800)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc, results, out


def test_dry_run_passes_every_check_it_can_run(dry_run) -> None:
    proc, results, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = results["checks"]
    assert list(checks) == ["throughput", "autocast", "lars", "photometric", "compile", "resume", "ffcv", "syncbn"]
    for name in ("throughput", "autocast", "lars", "photometric", "compile", "resume"):
        assert checks[name]["status"] == "PASS", (name, checks[name])
    assert checks["syncbn"]["status"] == "SKIP" and "two GPUs" in checks["syncbn"]["result"]
    assert checks["ffcv"]["status"] in ("PASS", "SKIP")
    assert results["dry_run"] is True


def test_dry_run_numbers(dry_run) -> None:
    _, results, out = dry_run
    c = results["checks"]
    fp32 = [r for r in c["throughput"]["result"]["rows"] if r["amp"] == "none"][0]
    assert fp32["images_per_s"] > 0 and fp32["step_s"] > 0
    assert [r["amp"] for r in c["throughput"]["result"]["rows"]] == ["fp16", "bf16", "none"]
    table = (out / "gpu_table.md").read_text()
    assert "| fp32 |" in table and "images/s" in table and "resnet18" in table
    assert c["resume"]["result"]["loss_rel_diff"] == 0.0 and c["resume"]["result"]["weight_max_diff"] == 0.0
    assert c["lars"]["result"]["max_abs_diff"] == 0.0
    assert c["compile"]["result"]["steps"] == 2
    for view in ("view1", "view2"):
        d = c["photometric"]["result"][view]["torch_vs_opencv"]
        assert d["mean"] < 1e-4


def test_without_cuda_the_gpu_run_refuses_with_a_hint(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out-dir", str(tmp_path)], cwd=REPO,
                          env={**child_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "--cpu-dry-run" in proc.stderr


def test_benchmarks_section_is_replaced_in_place(tmp_path) -> None:
    f = tmp_path / "BENCHMARKS.md"
    f.write_text("# Benchmarks\n\n## A\n\nkeep a\n\n## B\n\nkeep b\n")
    update_benchmarks("| t | 1 |\n", f)
    assert f.read_text().endswith(f"{BENCH_SECTION}\n\n| t | 1 |\n")
    update_benchmarks("| t | 2 |\n", f)
    text = f.read_text()
    assert text.count(BENCH_SECTION) == 1 and "| t | 2 |" in text and "| t | 1 |" not in text
    assert "keep a" in text and "keep b" in text
    f.write_text(f"# Benchmarks\n\n{BENCH_SECTION}\n\nold\n\n## Later\n\nkeep later\n")
    update_benchmarks("new\n", f)
    assert f.read_text() == f"# Benchmarks\n\n{BENCH_SECTION}\n\nnew\n\n## Later\n\nkeep later\n"
