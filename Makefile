# Two-command quick start: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch is pinned on the dev/test path (a CPU build of 2.13.0 is what this project tests with).
TORCH  ?= torch==2.13.0
# napari tests need a display: use a virtual one when xvfb-run is there (.ci/run installs it)
XVFB   := $(shell command -v xvfb-run >/dev/null 2>&1 && echo "xvfb-run -a")

.PHONY: demo test test-fast lint docs bench venv clean example segment ink

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH)
	touch $@

venv: $(VENV)/.installed

## demo: set up, then train a tiny 3D CNN on blocks streamed from example_zarr/ and print throughput
demo: $(VENV)/.installed
	$(PY) examples/train.py --data example_zarr/example.zarr

## test: set up, lint, then run the whole test suite
test: lint
	$(XVFB) $(VENV)/bin/pytest -q

## test-fast: the fast lane while working (under a minute): no test that starts processes,
## clusters, napari or subprocesses (the `slow` marker; tests/conftest.py marks them by their source)
test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m "not slow" -p no:cacheprovider

## lint: ruff, with the rules in pyproject.toml
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

## docs: the API reference from the docstrings (mkdocs + mkdocstrings), warnings are errors
docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict --quiet
	@echo "API reference: build/site/index.html"

## bench: the speed and memory benchmarks (prints numbers and ratios)
bench: $(VENV)/.installed
	$(PY) benchmarks/stream.py

## example: regenerate the synthetic example_zarr/example.zarr
example: $(VENV)/.installed
	$(PY) examples/make_example.py example_zarr/example.zarr

## segment: write the synthetic segment folder example_zarr/segment (volume, mask, ink labels)
segment: $(VENV)/.installed
	$(PY) examples/make_example.py --segment example_zarr/segment

## ink: train the ink example on it, export the model, predict the whole segment to prediction.png
ink: segment
	$(PY) examples/train_ink.py --segment example_zarr/segment --save inknet.pth
	$(PY) examples/export_model.py inknet.pth inknet.pt
	$(VENV)/bin/vesuvius-dask predict inknet.pt example_zarr/segment prediction.zarr --block 8,32,32 \
		--overlap 0,8,8 --mask --png prediction.png --overwrite

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
