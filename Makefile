# The README's two commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vlm2vec-rt-installed
# torch threads: the machines have 2 cores; more threads than cores only thrash
export OMP_NUM_THREADS ?= 2

.PHONY: demo test install bench lint clean

demo: $(STAMP)
	$(VENV)/bin/vlm2vec-rt quickstart

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/vlm2vec-rt bench all

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install: $(STAMP)

# Re-install when the packaging or the C++ sources change (the extension is built by pip).
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf build *.egg-info vlm2vec_rt/_C*.so
