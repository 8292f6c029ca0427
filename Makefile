# fss-jax developer commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two pytest workers (one per core); a test file stays on one worker (module-scoped jits).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup lint format typecheck test demo bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(VENV)/bin/activate  ## create .venv and install runtime + dev requirements
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt

lint:  ## ruff: lint rules and formatting (pyproject.toml [tool.ruff]); CI runs it before the tests
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:  ## apply ruff's formatter and safe lint fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

typecheck:  ## mypy on the package (pyproject.toml [tool.mypy])
	$(PY) -m mypy

# The train-step checks run first, on fresh workers: their verify subprocesses peak at up to
# 10 GB (SCCAN + PAHNet), and after the rest of the suite each worker holds 6-8 GB of jit caches.
TRAIN_STEP_TESTS := tests/test_train_step_sccan.py tests/test_train_step_hdmnet.py tests/test_train_step_cnn.py

test:  ## run the test suite (train-step checks first, then the rest)
	$(PY) -m pytest $(PYTEST_ARGS) $(TRAIN_STEP_TESTS)
	$(PY) -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(TRAIN_STEP_TESTS))

DEMO_DIR ?= $(CURDIR)/demo_out

demo:  ## synthetic data -> build -> train PANet -> evaluate -> overlays (into DEMO_DIR)
	$(PY) -m examples.demo --workdir $(DEMO_DIR)

bench:  ## benchmarks (print JSON)
	$(PY) bench/data_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
