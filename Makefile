# The two commands of the README: `make demo` and `make test`. Everything else they need
# is installed here, into .venv, on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned: on the build machines this is a local CPU wheel; unpinned torch pulls GBs of CUDA.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# Last, smdist itself again, editable as a plain path (.pth) instead of setuptools' import
# hook: the hook's finder imports pathlib, re and urllib in every interpreter of .venv before
# its first line (about 20 ms a start here), which a wheel install (an image) does not have.
AS_PATH := $(BIN)/pip install -q --disable-pip-version-check --no-deps \
	--config-settings editable_mode=compat -e .

.PHONY: demo test lint typecheck unit compose sdk bench clean

$(STAMP): pyproject.toml launchers/install-mpi.sh
	sh launchers/install-mpi.sh  # Open MPI + OpenSSH from Debian (mpi4py builds against them)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	# The frameworks extra: deepspeed's setup imports torch (no build isolation, no CUDA ops);
	# then DeepSpeed's CPU comm op, which it would otherwise compile on first use in a test.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --disable-pip-version-check --no-build-isolation \
		$(TORCH) -e '.[frameworks]'
	DS_ACCELERATOR=cpu $(BIN)/python -c \
		'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()'
	$(AS_PATH)
	touch $@

demo: $(STAMP)
	$(BIN)/smdist-run --simulate 2x2 --work-dir .smdist-work/demo examples/train_ddp.py --epochs 3

PY_DIRS := $(wildcard smdist tests bench compose launchers examples)

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)

typecheck: $(STAMP)
	$(BIN)/mypy smdist

unit: $(STAMP)
	$(BIN)/pytest -q -m 'not compose' tests

# The SageMaker SDK (v2, for its local mode) in a venv of its own: its ~65 dependencies
# never touch .venv. A no-op once installed; the compose tier's local-mode tests use it.
sdk: $(STAMP)
	$(BIN)/python -m compose.sdk install

compose: $(STAMP) sdk
	$(BIN)/pytest -q -m compose tests

test: lint typecheck $(STAMP) sdk
	$(BIN)/pytest -q tests

bench: $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	$(AS_PATH)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .venv-sdk .smdist-work .mypy_cache .ruff_cache .pytest_cache
