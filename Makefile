PYTHON ?= python3

.PHONY: install test test-all

install:
	$(PYTHON) -m pip install -r requirements.txt

# The suite CI runs (under 10 minutes on 2 CPU cores); installs first, so it works on a fresh machine.
test: install
	$(PYTHON) -m pytest -q -m "not slow"

# Everything, slow tests included.
test-all: install
	$(PYTHON) -m pytest -q
