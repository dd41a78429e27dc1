# Two commands: `make run` reproduces the study, `make test` runs the test suite.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SWEEP ?= sweeps/blog.toml

.PHONY: run test test-fast test-isa test-qemu test-avx2 test-cluster test-browser lint bench bench-scale clean

$(STAMP): pyproject.toml
	@echo "setting up $(VENV): calibjax, JAX and the test tools (first time: about 1 GB, a minute or two)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --progress-bar off -e '.[test]'
	$(VENV)/bin/python -m calibjax.execution.kernel_loader  # compile the CPU kernel now (else on first use; XLA if it cannot)
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/calibjax run $(SWEEP)

# Tests run in 2 processes (pytest-xdist): most of their time is compiling, which XLA does on one core.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check .
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS)

# The edit loop: everything but the tests marked slow (about 2 minutes here).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

# Another CPU generation: a sweep's shard trained on an Intel Haswell (AVX2, no AVX-512) emulated by
# Debian's qemu-user (installed here when missing; needs root) and merged with this CPU's, every table
# compared (about 5 minutes: QEMU compiles slowly); then the tests of numpy's dispatch, the kernel
# and the summaries again with the instruction set capped at AVX2 (tests/isa.py), so that CI on an
# AVX2 machine and on an AVX-512 one test both levels of numpy's code and of the kernel.
# (CI runs the two halves, test-qemu and test-avx2, beside the cluster and browser tests: QEMU keeps
# one core busy for minutes.)
NUMERICS := tests/test_portable.py tests/test_cpu_kernel.py tests/test_summaries.py tests/test_scale.py tests/test_density_law.py
test-isa: test-qemu test-avx2

test-qemu: $(STAMP)
	tests/install_packages.sh qemu-user
	$(VENV)/bin/python -m pytest -q --qemu -m qemu tests/test_portability.py

test-avx2: $(STAMP)
	@if grep -qw avx512f /proc/cpuinfo; then \
	  $(VENV)/bin/python tests/isa.py avx2 -- $(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" $(NUMERICS); \
	else echo "make test-avx2: this CPU has no AVX-512, so make test already ran every test at AVX2"; fi

# calibjax on a real one-node SLURM cluster started on localhost (Debian's slurm-wlm and munge,
# installed here when missing; needs root): submit, cancel, requeue, time limits (about 2 minutes).
test-cluster: $(STAMP)
	tests/install_packages.sh slurm-wlm munge
	$(VENV)/bin/python -m pytest -q --cluster tests/test_cluster.py

# The HTML report of the blog and atlas sweeps' results rendered in Debian's headless chromium
# (installed here when missing): every figure loads, and the interactive maps, driven through the
# DevTools protocol by Playwright (the browser extra; it drives Debian's chromium, downloads none),
# draw, show values on hover and redraw on every selector.
test-browser: $(STAMP)
	tests/install_packages.sh chromium
	$(VENV)/bin/python -m pip install --quiet --progress-bar off -e '.[browser]'
	$(VENV)/bin/python -m pytest -q --browser tests/test_report.py

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check .
	$(VENV)/bin/python -m ruff format --check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/throughput.py

# The host path (expansion, chunk writes, final tables, summaries, figures) at 10k, 100k and 1M runs, no training.
bench-scale: $(STAMP)
	$(VENV)/bin/python benchmarks/scale.py

clean:
	rm -rf $(VENV) .pytest_cache
