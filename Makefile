# The two commands for newcomers: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PROTO_SRC := $(shell find supervisor/api -name '*.proto')

# The containerd series `make test` runs the integration tests on besides the system's (1.6);
# each is fetched once by ../shared/conformance/fetch-containerd.sh (cached under /tmp).
SERIES ?= 2.1
FETCH_CONTAINERD := ../shared/conformance/fetch-containerd.sh

.PHONY: all venv bytecode deps lint test unit integration test-containerd proto demo conformance bench clean

all: test

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable finder costs every
	# shim start ~20 ms (importlib machinery, pathlib) before our code runs.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $@
	$(MAKE) --no-print-directory bytecode

# Shims start often: give them bytecode even where PYTHONDONTWRITEBYTECODE is set
# (Python still reads .pyc files; stale ones are ignored by their source mtime).
bytecode:
	$(PY) -m compileall -q supervisor

venv: $(VENV)/.stamp

deps:
	bash scripts/install-deps.sh

lint: venv
	$(VENV)/bin/ruff check supervisor tests bench
	$(VENV)/bin/mypy

# The whole suite: lint, types, unit tests and the integration tests against a
# private containerd (root), the system's (1.6); then the integration tests again on
# containerd $(SERIES) (SUPERVISOR_TEST_CONTAINERD, see tests/integration/harness.py).
# Long chaos/soak runs need `PYTEST_ARGS=--long`.
test: venv bytecode deps lint
	$(PY) -m pytest $(PYTEST_ARGS)
	bash $(FETCH_CONTAINERD) $(SERIES) >/dev/null
	SUPERVISOR_TEST_CONTAINERD=$(SERIES) $(PY) -m pytest tests/integration $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: venv deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

# Integration, CRI and chaos tests on one containerd series: `make test-containerd SERIES=1.7`.
test-containerd: venv bytecode deps
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
	bash scripts/conformance.sh

# ttrpc round trips per second over one connection.
bench: venv
	$(PY) bench/ttrpc_roundtrip.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
