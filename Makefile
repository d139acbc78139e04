# Fulcrum: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RECIPE ?= lm_transformer
WORKDIR ?= runs/$(RECIPE)
ARGS ?=
PROMPT ?= def __init__(self
BENCH ?= train scan scaling decode_latency optim decode attribution spin agents  # BENCH=scan: just one

.PHONY: setup demo test train eval decode calibrate speculative kvquant attribute spin agent agent-improve craftax test-craftax bench notebooks lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The fastest-learning small LM (recipe lm_quick), then a sampled continuation of $(PROMPT).
demo: setup
	$(BIN)/fulcrum train --recipe lm_quick --workdir runs/lm_quick $(ARGS)
	@echo "--- sample continuation (lm_quick's decode defaults: nucleus sampling, seed 0; 110 bytes stay in the 128-byte training context) ---"
	$(BIN)/fulcrum decode --workdir runs/lm_quick --prompt '$(PROMPT)' --max-new-tokens 110

# The Craftax tests (marker `craftax`: each compiles Craftax-Classic, ~80 s together) would put
# the suite past CI's 15-minute budget on 2 cores; `make test-craftax` runs them.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not craftax" --durations=15

test-craftax: setup
	$(BIN)/python -m pytest -q -m craftax

train: setup
	$(BIN)/fulcrum train --recipe $(RECIPE) --workdir $(WORKDIR) $(ARGS)

eval: setup
	$(BIN)/fulcrum eval --workdir $(WORKDIR)

decode: setup
	$(BIN)/fulcrum decode --workdir $(WORKDIR) --prompt '$(PROMPT)' $(ARGS)

calibrate: setup
	$(BIN)/fulcrum calibrate --workdir $(WORKDIR) $(ARGS)

# The demo LM with its 10x smaller draft: greedy, lookahead, speculative and cascade decoding.
speculative: setup
	$(BIN)/fulcrum train --recipe demo --workdir runs/demo
	$(BIN)/fulcrum train --recipe lm_draft --workdir runs/lm_draft
	for s in greedy lookahead speculative cascade; do \
	  $(BIN)/fulcrum decode --workdir runs/demo --draft-workdir runs/lm_draft --strategy $$s \
	    --prompt '$(PROMPT)' --json || exit $$?; done

# The demo LM decoding from a 3-bit KVQuant cache.
kvquant: setup
	$(BIN)/fulcrum train --recipe decode_kvquant --workdir runs/decode_kvquant
	$(BIN)/fulcrum calibrate --workdir runs/decode_kvquant
	$(BIN)/fulcrum decode --workdir runs/decode_kvquant --prompt '$(PROMPT)'

# Explain the demo LM's next-token prediction: HTML heatmaps in runs/demo/attribution/.
METHOD ?= integrated_gradients
attribute: setup
	$(BIN)/fulcrum train --recipe demo --workdir runs/demo
	$(BIN)/fulcrum attribute --workdir runs/demo --input '$(PROMPT)' --method $(METHOD) $(ARGS)

# Self-play fine-tuning: the instruct_sft model, then 3 SPIN iterations; prints the per-iteration
# table (held-out exact match, reward accuracy, log-probs of gold and generated answers).
spin: setup
	$(BIN)/fulcrum train --recipe instruct_sft --workdir runs/instruct_sft $(ARGS)
	$(BIN)/fulcrum train --recipe spin --workdir runs/spin --set spin.init_from=runs/instruct_sft

# A behaviour-cloned LM agent on the farming world's Lite tasks, then its held-out success rates
# and one recorded episode (runs/agent_bc/episode.txt and .gif).
agent: setup
	$(BIN)/fulcrum train --recipe agent_bc --workdir runs/agent_bc $(ARGS)
	$(BIN)/fulcrum agent eval --workdir runs/agent_bc --tasks lite --episodes 8 --record runs/agent_bc/episode

# DAgger rounds on the agent's own rollouts (~10 min each), from `make agent`'s runs/agent_bc;
# prints the per-round table (held-out success with 95% intervals, the labelled states).
agent-improve: setup
	test -d runs/agent_bc/checkpoints || $(MAKE) agent
	$(BIN)/fulcrum train --recipe agent_improve --workdir runs/agent_improve --set improve.init_from=runs/agent_bc $(ARGS)
	$(BIN)/fulcrum agent eval --workdir runs/agent_improve --tasks lite --episodes 8

# PPO on Craftax-Classic (an MLP policy): achievement success rates and the Crafter score.
craftax: setup
	$(BIN)/fulcrum train --recipe craftax_ppo --workdir runs/craftax_ppo $(ARGS)

bench: setup
	for b in $(BENCH); do $(BIN)/fulcrum bench $$b --json || exit $$?; done

notebooks: setup
	$(BIN)/python -m pytest -q tests/test_notebooks.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
