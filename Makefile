# cdp — the two commands of the README, and a few more.
#   make serve   set up (runtime dependencies only) and run the appliance on the embedded default (config/cdp.toml)
#   make test    set up (venv + system tools + a test Ceph RGW) and run the whole test suite, lint and types
# a Python 3.13+ if the machine has one (its ssl serves NBD TLS pre-shared keys; a
# pyenv install counts), else python3
PYTHON ?= $(shell for p in python3.14 python3.13 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[3-9]*/bin/python3; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null && { echo $$p; exit; }; done; echo python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUNTIME_STAMP := $(VENV)/.runtime-stamp

.PHONY: serve test check lint typecheck unit bench bench-quick sysdeps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

# serve needs the runtime dependencies only (no test and lint toolchain); the full
# set-up ($(STAMP)) includes them, so serving after `make test` installs nothing
$(RUNTIME_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -f $(STAMP) -a $(STAMP) -nt pyproject.toml || $(BIN)/python -m pip install -q -e .
	@touch $@

serve: $(RUNTIME_STAMP)
	$(BIN)/cdpd

sysdeps:
	tools/install-system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# the S3 tests' Ceph RGW (tools/ceph-s3) is up for the whole run; stopped at the end
# unless it was already running before. Test files run on TEST_WORKERS pytest-xdist
# workers, each file whole on one worker (its module fixtures, a guest VM or a browser,
# start once) and the S3 files together (one kills and restarts the RGW: see
# tests/conftest.py); most tests wait on real daemons and disks, so 2 workers fit 2 cores.
TEST_WORKERS ?= 2
test: $(STAMP) sysdeps lint typecheck
	@if tools/ceph-s3 status >/dev/null 2>&1; then stop=:; else stop='tools/ceph-s3 stop'; fi; \
	trap "$$stop" EXIT; trap 'exit 130' INT TERM; \
	tools/ceph-s3 up && eval "$$(tools/ceph-s3 env)" && \
	$(BIN)/python -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/property

bench: $(STAMP) sysdeps
	$(BIN)/python -m tools.bench

bench-quick: $(STAMP) sysdeps
	$(BIN)/python -m tools.bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results
