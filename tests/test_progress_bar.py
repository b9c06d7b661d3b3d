"""``log.progress_bar``: a bar on a terminal, plain periodic log lines in a file (a SLURM log)."""
from __future__ import annotations

import io
import subprocess

import pytest

from pretrain.config import load_config
from pretrain.demo import _progress_bar_override
from pretrain.engine.hooks import progress_bar_on
from tests._engine_common import PY, REPO, child_env, make_toy, tiny_overrides


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_follows_the_stream_and_true_false_force_it() -> None:
    assert progress_bar_on("auto", _Tty()) is True
    assert progress_bar_on("auto", io.StringIO()) is False
    for forced, want in (("true", True), ("True", True), (True, True), ("false", False), ("False", False)):
        assert progress_bar_on(forced, io.StringIO()) is want
        assert progress_bar_on(forced, _Tty()) is want


def test_yaml_and_command_line_spellings_load_and_a_bad_value_is_named() -> None:
    base = REPO / "configs/pretrain/demo_cpu.yaml"
    assert load_config(base).log.progress_bar == "auto"
    for v in ("true", "false", "auto", "True"):
        assert progress_bar_on(load_config(base, [f"log.progress_bar={v}"]).log.progress_bar, io.StringIO()) is (
            v.lower() == "true")
    with pytest.raises(Exception, match="log.progress_bar"):
        load_config(base, ["log.progress_bar=sometimes"])


def test_demo_forces_the_bar_only_on_a_terminal() -> None:
    assert _progress_bar_override(_Tty()) == ["log.progress_bar=true"]
    assert _progress_bar_override(io.StringIO()) == []


def _log_of_a_run(tmp_path, setting: str) -> str:
    toy = make_toy(tmp_path / "toy") if not (tmp_path / "toy").exists() else tmp_path / "toy"
    out = tmp_path / f"slurm-{setting}.out"
    ovr = tiny_overrides(toy, tmp_path / f"run_{setting}", **{"log.progress_bar": setting, "train.max_steps": 2,
                                                             "train.epochs": 1})
    with open(out, "w") as f:  # stdout and stderr into one file, as sbatch --output does
        p = subprocess.run([PY, "-m", "pretrain", *ovr], cwd=REPO, env=child_env(), stdout=f,
                           stderr=subprocess.STDOUT, timeout=600)
    text = out.read_bytes().decode()  # bytes: read_text() would turn each \r into \n
    assert p.returncode == 0, text[-3000:]
    return text


def test_a_log_file_gets_log_lines_and_no_carriage_returns(tmp_path) -> None:
    auto = _log_of_a_run(tmp_path, "auto")
    assert "\r" not in auto
    assert "epoch 0 step 1/" in auto  # the periodic log line carries the progress instead
    assert "\r" in _log_of_a_run(tmp_path, "true")


def test_python_m_pretrain_exits_64_on_a_bad_value(tmp_path) -> None:
    p = subprocess.run([PY, "-m", "pretrain", str(REPO / "configs/pretrain/demo_cpu.yaml"), "log.progress_bar=2"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 64 and "log.progress_bar" in p.stderr, p.stderr[-2000:]
