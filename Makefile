# fss-jax developer commands.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two pytest workers (one per core); a test file stays on one worker (module-scoped jits).
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: setup test demo bench clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(VENV)/bin/activate  ## create .venv and install runtime + dev requirements
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt

test:  ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

DEMO_DIR ?= $(CURDIR)/demo_out

demo:  ## synthetic data -> build -> train PANet -> evaluate -> overlays (into DEMO_DIR)
	$(PY) -m fss_jax.demo --workdir $(DEMO_DIR)

bench:  ## benchmarks (print JSON)
	$(PY) bench/data_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
