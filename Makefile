# The README's two commands: `make demo` and `make test`.
PY := .venv/bin/python
.PHONY: setup setup-test demo test test-fast bench gpu-check clean

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

demo: setup
	$(PY) -m pretrain.demo

test: setup-test
	PRETRAIN_REQUIRE_SLURM=1 $(PY) -m pytest -q -ra --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" tests

bench: setup
	$(PY) tools/bench_all.py

# Every CUDA-only path on one GPU (about 5 minutes); writes the GPU table into BENCHMARKS.md.
gpu-check: setup
	$(PY) tools/gpu_check.py --update-benchmarks

clean:
	rm -rf runs work_dirs .pytest_cache
