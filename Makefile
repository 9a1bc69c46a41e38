# The two commands of the README. Each creates .venv when it is missing and installs into it.
# PYTHON picks the interpreter that builds the venv (3.10+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench install clean

$(BIN)/medvae: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $(BIN)/medvae

install: $(BIN)/medvae

demo: $(BIN)/medvae
	$(BIN)/medvae demo

test: $(BIN)/medvae
	$(BIN)/python -m pytest -q

# the import layering of docs/architecture.md (pyproject.toml [tool.importlinter]); .ci/run runs it too
lint: $(BIN)/medvae
	$(BIN)/lint-imports

bench: $(BIN)/medvae
	$(BIN)/pip install --disable-pip-version-check -q -e '.[bench]'
	$(BIN)/python scripts/bench_speed.py
	$(BIN)/python scripts/bench_quality.py

clean:
	rm -rf $(VENV) demo_out
