# The README's commands. Each installs what it needs into $(VENV) first.
#   make demo   install, then opd vs trd vs trd_splice on the shipped task (runs/demo/report.json)
#   make pretrain  install, then retrain the shipped task's teacher and student from their seed
#   make test   install, then the whole test suite (CPU; Triton kernels through the interpreter)
#   make test-floors  the trainer, task and integration tests in $(FLOOR_VENV), at pyproject.toml's floors
#   make bench  install, then the CPU benchmarks (not part of make test)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
export MAX_JOBS ?= 2
# The torch whose CPU wheel this machine holds: both venvs install it (where no torch is importable).
CPU_TORCH := 2.13.0

.PHONY: install demo pretrain test test-floors bench clean

install: $(VENV)/.installed

# Keep a torch that is already importable (a GPU box): the venv then sees the system site-packages.
# Otherwise install torch==$(CPU_TORCH).
$(VENV)/bin/python:
	@if python3 -c "import torch" 2>/dev/null; then \
		echo "make: using the importable torch $$(python3 -c 'import torch; print(torch.__version__)')"; \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(VENV)/bin/python -m pip --disable-pip-version-check install -q torch==$(CPU_TORCH); \
	fi

$(VENV)/.installed: $(VENV)/bin/python $(SOURCES)
	$(PIP) install -q setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@touch $@

demo: install
	$(PY) -m trd_fast.cli demo

pretrain: install
	$(PY) -m trd_fast.cli pretrain

test: install
	$(PY) -m pytest -q tests

# The floor venv: torch==$(CPU_TORCH) first, then the package with every pure-Python floor pinned (.ci/floors.py),
# so pip never resolves another torch. It is editable and builds no extension: it loads the trd_fast._C that
# `install` built in place for the same torch. $(VENV) is not touched.
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS := tests/test_trainer_*.py tests/test_task.py tests/test_integration_*.py

$(FLOOR_VENV)/.installed: pyproject.toml .ci/floors.py | install
	rm -rf $(FLOOR_VENV)
	python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check install -q torch==$(CPU_TORCH) setuptools wheel
	$(PY) .ci/floors.py $(CPU_TORCH) > $(FLOOR_VENV)/constraints.txt
	TRD_FAST_SKIP_EXT=1 $(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check install -q \
		-c $(FLOOR_VENV)/constraints.txt --no-build-isolation -e ".[test]"
	@touch $@

test-floors: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -m pip --disable-pip-version-check list 2>/dev/null \
		| grep -iE "^(torch|transformers|trl|peft|accelerate|datasets|triton) "
	$(FLOOR_VENV)/bin/python -m pytest -q $(FLOOR_TESTS)

bench: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,min,max,rounds
	$(PY) -m bench.fused_linear
	$(PY) -m bench.engine_scale

clean:
	rm -rf build *.egg-info trd_fast/_C*.so
