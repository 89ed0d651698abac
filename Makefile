# The README's commands. Each installs what it needs into $(VENV) first.
#   make demo   install, then opd vs trd vs trd_splice on the shipped task (runs/demo/report.json)
#   make pretrain  install, then retrain the shipped task's teacher and student from their seed
#   make test   install, then the whole test suite (CPU; Triton kernels through the interpreter)
#   make bench  install, then the CPU benchmarks (not part of make test)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
export MAX_JOBS ?= 2

.PHONY: install demo pretrain test bench clean

install: $(VENV)/.installed

# Keep a torch that is already importable (a GPU box): the venv then sees the system site-packages.
# Otherwise install torch==2.13.0, whose CPU wheel this machine holds.
$(VENV)/bin/python:
	@if python3 -c "import torch" 2>/dev/null; then \
		echo "make: using the importable torch $$(python3 -c 'import torch; print(torch.__version__)')"; \
		python3 -m venv --system-site-packages $(VENV); \
	else \
		python3 -m venv $(VENV) && $(VENV)/bin/python -m pip --disable-pip-version-check install -q torch==2.13.0; \
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

bench: install
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=median,min,max,rounds

clean:
	rm -rf build *.egg-info trd_fast/_C*.so
