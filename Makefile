# make quickstart : set up (virtual env, dependencies, MNIST) and train M1 with 100 labels on the CPU
# make test       : set up and run the test suite
# make test-cluster : start a one-node SLURM cluster here (as root), run tests/cluster against it, stop it
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: quickstart test test-cluster venv clean-venv

venv: $(VENV)/.installed

# uv installs what pip would (pip's indexes, wheel cache and constraints: scripts/uv_args.py) in a fraction of the
# time; pip itself where uv cannot be had. torch/torchvision come from this machine's wheel cache where one is
# configured, else from PyPI.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	( $(BIN)/python -m pip install --quiet uv && \
	  $(BIN)/python -m uv pip install --quiet --compile-bytecode --python $(BIN)/python $$($(BIN)/python scripts/uv_args.py) -e '.[dev]' ) \
	|| $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

quickstart: venv
	$(BIN)/python scripts/quickstart.py

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

CLUSTER ?= /tmp/ssvae-slurm
test-cluster: venv
	@scripts/cluster/local_cluster.sh start $(CLUSTER) >/dev/null; status=$$?; \
	if [ $$status -eq 0 ]; then SLURM_CONF=$(CLUSTER)/slurm.conf $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/cluster; status=$$?; fi; \
	scripts/cluster/local_cluster.sh stop $(CLUSTER); exit $$status

clean-venv:
	rm -rf $(VENV)
