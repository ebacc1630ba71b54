# make demo / make test work on a fresh machine: both install into .venv first when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint demo bench clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# ruff (ruff.toml: pyflakes + syntax errors, the whole repo) and mypy (mypy.ini: structures/
# and inference/); both come with the dev extra, pinned in constraints.txt.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m detector.demo

clean:
	rm -rf $(VENV) *.egg-info
