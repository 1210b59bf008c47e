# The two commands of the README: `make demo` and `make test`.
# Both create .venv if it is missing and install the project once; the stamp
# file is rebuilt only when pyproject.toml changes, so a second run does not reinstall.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.litvision-installed
DEMO_DIR ?= demo

.PHONY: install demo test test-all test-faults lint clean

install: $(STAMP)

$(PY):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "litvision needs Python >= 3.10, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) train.py demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

# The fault suite, slow cases included: broken input files through the real commands (tests/faults/).
test-faults: $(STAMP)
	$(PY) -m pytest tests/faults -q

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs
