# make quickstart : set up (virtual env, dependencies, MNIST) and train M1 with 100 labels on the CPU
# make test       : set up and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: quickstart test venv clean-venv

venv: $(VENV)/.installed

# pip takes torch/torchvision from this machine's wheel cache where one is configured, else from PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

quickstart: venv
	$(BIN)/python scripts/quickstart.py

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean-venv:
	rm -rf $(VENV)
