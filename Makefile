# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   set up .venv and run the main job on the real data
#   make test   set up .venv and run lint, type checks and the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where the real traces and prompts live (see ../shared/data/README.md).
DATA ?= ../shared/data
# Extras installed with the package; CI adds `torch` to test the SGLang .pt importers.
EXTRAS ?= dev
# With torch, SGLang itself (no dependencies) so tests can compare our EPLB with its own.
SGLANG ?= sglang==0.5.23
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
TRACES := $(DATA)/traces/esft-deepseek-v2-lite $(DATA)/traces/sglang-deepseek-v3-eplb-stats \
          $(DATA)/traces/mixtral-humaneval-gsm8k-small
DEMO_OUT ?= demo-output

.PHONY: setup demo test lint analysis bench clean protos

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(if $(findstring torch,$(EXTRAS)),$(BIN)/python -m pip install --quiet --no-deps '$(SGLANG)')
	@touch $@

.PHONY: check-data
check-data:
	@test -d $(DATA)/traces || { echo "real data not found at $(DATA) (set DATA=/path/to/shared/data)"; exit 2; }

demo: setup check-data
	@mkdir -p $(DEMO_OUT)
	$(BIN)/moe-scheduler profile $(DATA)/traces/esft-deepseek-v2-lite --by label --out $(DEMO_OUT)/esft.profile.json
	$(BIN)/moe-scheduler profile $(DATA)/traces/esft-deepseek-v2-lite --by cluster --k 4 --out $(DEMO_OUT)/esft.clusters.profile.json
	$(BIN)/moe-scheduler profile $(DATA)/traces/sglang-deepseek-v3-eplb-stats --out $(DEMO_OUT)/deepseek-v3.profile.json
	$(BIN)/moe-scheduler profile $(DATA)/traces/mixtral-humaneval-gsm8k-small --out $(DEMO_OUT)/mixtral.profile.json
	$(BIN)/moe-scheduler analyze $(TRACES) --out $(DEMO_OUT)/analysis.md
	$(BIN)/moe-scheduler place --profile $(DEMO_OUT)/esft.profile.json --topology deploy/topologies/4x2.toml --redundant-experts 16 --time-limit 10 --out $(DEMO_OUT)/esft-placement
	$(BIN)/moe-scheduler place --profile $(DEMO_OUT)/deepseek-v3.profile.json --topology deploy/topologies/4x8.toml --time-limit 5 --out $(DEMO_OUT)/deepseek-v3-placement
	$(BIN)/moe-scheduler fit --data $(DATA) --out $(DEMO_OUT)/predictors.npz
	$(BIN)/moe-scheduler demo --data $(DATA) --placement $(DEMO_OUT)/esft-placement --profile $(DEMO_OUT)/esft.profile.json --bundle $(DEMO_OUT)/predictors.npz --out $(DEMO_OUT)/serving
	@echo
	@echo "Demo done. Report: $(DEMO_OUT)/analysis.md (figures in $(DEMO_OUT)/analysis-figures/);"
	@echo "profiles: $(DEMO_OUT)/*.profile.json; placements (SGLang expert_location.json +"
	@echo "plan.json): $(DEMO_OUT)/esft-placement/, $(DEMO_OUT)/deepseek-v3-placement/;"
	@echo "serving demo (gRPC scheduler + SGLang emulator): $(DEMO_OUT)/serving/serving.md"

lint: setup
	$(BIN)/ruff check scheduler tests benchmarks
	$(BIN)/ruff format --check scheduler tests benchmarks
	$(BIN)/mypy

test: setup lint
	MOE_SCHEDULER_DATA=$(DATA) $(BIN)/python -m pytest -q

# Regenerate the committed gRPC code (scheduler/api/v1/) from protos/; a test fails if stale.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. protos/scheduler/api/v1/scheduler.proto

# Regenerate the committed docs/analysis.md from the real data.
analysis: setup check-data
	$(BIN)/moe-scheduler analyze $(TRACES) --out docs/analysis.md

# Run the benchmarks and render benchmarks/RESULTS.md from their JSON.
bench: setup
	$(MAKE) --no-print-directory setup EXTRAS=$(EXTRAS),bench
	$(BIN)/python -m benchmarks.profile_scale --no-compress
	$(BIN)/python -m benchmarks.emulator_throughput
	$(BIN)/python -m benchmarks.predictors --data $(DATA)
	$(BIN)/python -m benchmarks.placement --data $(DATA)
	$(BIN)/python -m benchmarks.accounting_speed --data $(DATA)
	$(BIN)/python -m benchmarks.policy_grid --data $(DATA)
	$(BIN)/python -m benchmarks.frontend --data $(DATA)
	$(BIN)/python -m benchmarks.dataplane --data $(DATA)
	$(BIN)/python -m benchmarks.policy_grid_production --data $(DATA)
	$(BIN)/python -m benchmarks.render

clean:
	rm -rf $(VENV) $(DEMO_OUT) benchmarks/work .pytest_cache .mypy_cache .ruff_cache
