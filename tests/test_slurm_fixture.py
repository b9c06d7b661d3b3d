"""The real-SLURM fixture's decision when SLURM does not start: skip in a plain pytest run, fail under
``make test`` (``PRETRAIN_REQUIRE_SLURM=1``), which installed SLURM and so must run those tests.

The conftest fixture itself runs in an inner pytest session (pytester, in this process), with the
cluster's start replaced by one that fails as a daemon that would not come up does.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import slurm_cluster as sc

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
LOG_TAIL = "slurmctld: fatal: Unable to bind listen port (a log tail line)"


@pytest.fixture
def start_fails(monkeypatch):
    calls = []

    def fail(cls, root, **kwargs):
        calls.append(kwargs)
        raise sc.SlurmUnavailable(f"slurmctld not ready after 60s; log tail:\n{LOG_TAIL}")

    monkeypatch.setattr(sc.SlurmCluster, "start", classmethod(fail))
    return calls


def _run_fixture(pytester: pytest.Pytester):
    pytester.makeconftest("from tests.conftest import slurm, slurm_cluster  # noqa: F401\n")
    pytester.makepyfile(test_inner="def test_needs_slurm(slurm):\n    pass\n")
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")


def test_fixture_fails_with_the_log_tail_when_slurm_is_required(pytester, monkeypatch, start_fails):
    monkeypatch.setenv(sc.REQUIRE_ENV, "1")
    res = _run_fixture(pytester)
    res.assert_outcomes(errors=1)
    out = res.stdout.str()
    assert LOG_TAIL in out and sc.REQUIRE_ENV in out
    assert start_fails == [{"nodes": 2, "cpus_per_node": 2}]


@pytest.mark.parametrize("value", [None, "", "0"])
def test_fixture_skips_when_slurm_is_not_required(pytester, monkeypatch, start_fails, value):
    if value is None:
        monkeypatch.delenv(sc.REQUIRE_ENV, raising=False)
    else:
        monkeypatch.setenv(sc.REQUIRE_ENV, value)
    res = _run_fixture(pytester)
    res.assert_outcomes(skipped=1)
    assert LOG_TAIL in res.stdout.str()  # -rs prints the reason


def _outcome(tmp_path) -> BaseException:
    # caught as BaseException: a skip escaping a narrower pytest.raises would skip this test, not fail it
    with pytest.raises(BaseException) as e:
        sc.start_or_skip(tmp_path)
    return e.value


def test_start_or_skip_decision(tmp_path, monkeypatch, start_fails):
    monkeypatch.setenv(sc.REQUIRE_ENV, "1")
    e = _outcome(tmp_path)
    assert type(e) is pytest.fail.Exception and LOG_TAIL in str(e)
    monkeypatch.delenv(sc.REQUIRE_ENV)
    e = _outcome(tmp_path)
    assert type(e) is pytest.skip.Exception and LOG_TAIL in str(e)


def test_other_errors_are_neither_skip_nor_fail(tmp_path, monkeypatch):
    # a bug in the cluster code must surface as itself, not as "SLURM unavailable"
    def broken(cls, root, **kwargs):
        raise TypeError("bug")

    monkeypatch.setattr(sc.SlurmCluster, "start", classmethod(broken))
    for value in ("1", "0"):
        monkeypatch.setenv(sc.REQUIRE_ENV, value)
        with pytest.raises(TypeError, match="bug"):
            sc.start_or_skip(tmp_path)


def test_make_test_requires_slurm():
    # `make test` installs SLURM (setup.sh --test) and runs pytest with the variable set; CI runs `make test`
    make = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", make, re.M)
    assert recipe and "setup-test" in recipe.group(0).splitlines()[0]
    assert re.search(rf"\b{sc.REQUIRE_ENV}=1 .*-m pytest\b", recipe.group(1))
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)
