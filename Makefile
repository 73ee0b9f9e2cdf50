# The two commands for newcomers: `make demo` and `make test`.
# The venv's interpreter: PYTHON if given (a path, or a name found on PATH or among pyenv's
# versions, e.g. `make test PYTHON=python3.13`), else the best one installed, by
# scripts/best-python (the order and why: docs/benchmarks.md, "Which Python").  VENV may be
# set too, for a venv per interpreter side by side.
PYTHON ?=
VENV   ?= .venv
BASE_PYTHON := $(shell sh scripts/best-python $(PYTHON))
PY     := $(VENV)/bin/python
PROTO_SRC := $(shell find supervisor/api -name '*.proto')

# The containerd series `make test` runs the integration tests on besides the system's (1.6);
# each is fetched once by ../shared/conformance/fetch-containerd.sh (cached under /tmp).
# SERIES (no default) picks one for `make test-containerd` and `make conformance`.
TEST_SERIES ?= 2.1
FETCH_CONTAINERD := ../shared/conformance/fetch-containerd.sh

.PHONY: FORCE all venv bytecode deps lint test unit integration test-containerd proto demo conformance bench clean

all: test

# The venv is made anew when BASE_PYTHON is not the interpreter it was made from.
$(VENV)/.python: FORCE
	@test -n "$(BASE_PYTHON)" || { echo "no usable Python (PYTHON=$(PYTHON)), see above" >&2; exit 1; }
	@mkdir -p $(VENV); echo '$(BASE_PYTHON)' | cmp -s - $@ || echo '$(BASE_PYTHON)' > $@

$(VENV)/.stamp: pyproject.toml $(VENV)/.python
	$(BASE_PYTHON) -m venv --clear $(VENV)
	echo '$(BASE_PYTHON)' > $(VENV)/.python
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs every
	# shim start ~20 ms (importlib machinery, pathlib) before our code runs.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@
	$(MAKE) --no-print-directory bytecode

# The shim binary as `python -IS` (no site, no `import re`): pip's console script cannot
# carry interpreter flags (supervisor/launch/launcher.py). Rewritten after every install.
SHIM_ENTRY := $(VENV)/bin/containerd-shim-supervisor-v2
$(SHIM_ENTRY): $(VENV)/.stamp supervisor/launch/launcher.py
	$(PY) -m supervisor.launch.launcher $@ >/dev/null

# Shims start often: give them bytecode even where PYTHONDONTWRITEBYTECODE is set
# (Python still reads .pyc files; stale ones are ignored by their source mtime).
bytecode:
	$(PY) -m compileall -q supervisor

venv: $(VENV)/.stamp $(SHIM_ENTRY)

deps:
	bash scripts/install-deps.sh

lint: venv
	$(VENV)/bin/ruff check supervisor tests bench
	$(VENV)/bin/mypy

# The whole suite: lint, types, unit tests and the integration tests against a
# private containerd (root), the system's (1.6); then the integration tests again on
# containerd $(TEST_SERIES) (SUPERVISOR_TEST_CONTAINERD, see tests/integration/harness.py).
# Long chaos/soak runs need `PYTEST_ARGS=--long`.
test: venv bytecode deps lint
	$(PY) -m pytest $(PYTEST_ARGS)
	bash $(FETCH_CONTAINERD) $(TEST_SERIES) >/dev/null
	SUPERVISOR_TEST_CONTAINERD=$(TEST_SERIES) $(PY) -m pytest tests/integration $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# Integration, CRI and chaos tests on one containerd series: `make test-containerd SERIES=1.7`.
test-containerd: venv bytecode deps
	@test -n "$(SERIES)" || { echo "make test-containerd SERIES=1.6|1.7|2.1" >&2; exit 2; }
	bash $(FETCH_CONTAINERD) $(SERIES) >/dev/null
	SUPERVISOR_TEST_CONTAINERD=$(SERIES) $(PY) -m pytest tests/integration tests/cri tests/chaos $(PYTEST_ARGS)

# Regenerate the checked-in protobuf modules from our own .proto files.
proto: venv
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. $(PROTO_SRC)

# A real container through the shim with a private containerd (root, Debian).
demo:
	bash scripts/demo.sh

# containerd's own suites (../shared/conformance) against this shim; needs Go, ~5 min.
conformance: venv
	SERIES=$(SERIES) bash scripts/conformance.sh

# ttrpc round trips per second over one connection.
bench: venv
	$(PY) bench/ttrpc_roundtrip.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
