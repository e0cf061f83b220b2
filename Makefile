# Two commands for a fresh machine: `make demo` (install + run the main job on the embedded
# default) and `make test` (install + run the test suite). `.ci/run` runs `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast schemas bench bench-expand bench-detect bench-self-training bench-real-anatomy bench-build clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --no-cache-dir --upgrade pip
	# Pinned: pip takes these two from local disk here; a bare `torch` is a multi-GB download.
	$(PIP) install --quiet --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet --no-cache-dir -e '.[test,onnx,scale]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash scripts/demo.sh

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -m "not slow"


bench: bench-expand bench-detect bench-real-anatomy bench-build

bench-self-training: install
	$(PY) bench/self_training.py

bench-real-anatomy: install
	$(PY) bench/real_anatomy.py

bench-detect: install
	$(PY) bench/detect_throughput.py

# A whole build per stage against detect alone: 256 synthetic 512-px images and ../shared/real_fundus.
bench-build: install
	$(PY) bench/build_throughput.py

bench-expand: install
	$(PY) bench/expand_throughput.py

bench-scale: install
	$(PY) bench/scale.py

schemas: install
	$(PY) -m fundus_engine.schemas

clean:
	rm -rf demo .prefect
