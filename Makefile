# Entry points: `make demo` (install, then run the demo flow), `make check` (the fast tier) and `make test` (the suite).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: install demo check test lint bytecode clean

install: $(STAMP)

# Without CUDA, take the CPU build of torch first (on this project's build machines it lies on disk);
# with CUDA, the constraints' torch comes from the normal index as a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# The toy world: the shipped toy-sd model learns a subject it never saw; the report shows before and after.
demo: install
	$(VENV)/bin/boothflow run --config configs/toy.toml --summary artifacts/toy-summary.json
	@echo "summary: artifacts/toy-summary.json; open the report_html it names (outputs under artifacts/)"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The suite starts hundreds of Python processes. Where PYTHONDONTWRITEBYTECODE is set, none of them would cache the
# project's compiled modules, and each would compile them again (about a second a process): compile them once here.
bytecode: install
	$(PY) -m compileall -q flows tasks tests benchmarks

# The fast tier, for a change to one module: lint and the tests that need no Prefect server, browser or training run.
check: install lint bytecode
	$(PY) -m pytest -q -m "not server and not browser and not training" --durations=10

# Everything (CI), on two workers: its units of work, and which start first, are in tests/conftest.py.
test: install lint bytecode
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=20

clean:
	rm -rf artifacts .pytest_cache
