# `make benchmark` and `make test` set themselves up: they (re)create .venv whenever
# pyproject.toml is newer than the last install, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: benchmark smoke study test test-slow venv clean

# pip byte-compiles what it installs on one core; compileall does it on all of them (~30 s less here).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	@$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true  # a few vendored test files do not compile
	@touch $(STAMP)

venv: $(STAMP)

# The main job: VCM at N = 50 on task lv with the shipped cpu base model and the committed cpu recipe
# (benchmark/recipes/cpu/lv.yaml, where it names the method), beside the four reference rows; 16 test
# subjects (the profile's 64 are for the study: every row's FRD extracts radiomics of each volume), each
# sampled with its own and with another subject's condition (Control Δ); a probe on validation subjects
# before training and at steps 150 and 300 (README "What to expect on CPU").
# METHODS=vcm,ldm_finetune adds the fine-tuned LDM; METHODS=all: every method.
METHODS ?= vcm
benchmark: $(STAMP)
	$(PY) run_benchmark.py --profile cpu --methods $(METHODS) --sizes 50 --task lv --seeds 0 \
		--no-validation --override sampling.n_test=16 --override training.checkpoint_every=150 \
		--out results/benchmark

# Every method at every size on the smoke profile: the machinery in minutes, no control to see.
smoke: $(STAMP)
	$(PY) run_benchmark.py --profile smoke --methods all --sizes 10,50,500 --task lv --seeds 0 --out results/smoke

# The study of record (studies/cpu.yaml): runs what is missing (days on 2 cores; resumable), then rebuilds
# studies/cpu/ (records, tables, figures, REPORT.md). With the committed records present it runs nothing.
# JOBS=2: two runs at once, one thread each (on 2 cores 1.18x the steps per hour: docs/SPEED.md).
JOBS ?= 1
study: $(STAMP)
	$(PY) run_benchmark.py study studies/cpu.yaml --jobs $(JOBS)

# The fast suite, one pytest-xdist worker per core (at most 4; tests/conftest.py gives each one thread).
# Tests marked `slow` sample the shipped cpu base model (a few minutes on 2 cores) and run with
# `make test-slow`.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n auto --maxprocesses 4 --dist worksteal tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV)
