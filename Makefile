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

# The README's main command: builtin data -> Min-SNR-5 DiT under torchrun -> class grid -> FID
# (offline, on 2 CPU cores; see quickstart.sh for its steps and environment overrides). Not `install`
# first: quickstart.sh runs pip only when a package is missing, so a second run starts at once.
.PHONY: quickstart
quickstart:
	PYTHON=$(PYTHON) bash quickstart.sh
