# The two commands of the README:  `make demo`  and  `make test`  (and `make stages`: the three-stage recipe).
# TORCH_SPEC pins the CPU build that lies on the machines' disk; override for GPUs,
# e.g.  make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO       ?= demo_out
DEMO_STEPS ?= 200
PY          = $(VENV)/bin/python
PIP         = $(VENV)/bin/pip

.PHONY: setup demo-data demo stages test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Synthetic nuScenes-format data -> scene processing -> tiny CogVAE -> shards -> tiny MVDiT -> sample video.
# Each line is a command a user can run alone; every step resumes or overwrites, so a re-run is safe.
# demo-data: the shards and the caption cache that `demo` and `stages` train on.
demo-data: setup
	$(PY) -m pipeline.synth --out $(DEMO)/nuscenes --scenes 2 --seconds 8 --image-size 400x225 --seed 0
	$(PY) -m pipeline.shards.vae --out $(DEMO)/tiny-cogvae
	$(PY) pipeline/build.py --config demo --dataroot $(DEMO)/nuscenes --version v1.0-synth \
	    --out $(DEMO)/shards --vae $(DEMO)/tiny-cogvae
	$(PY) -m model.text tiny $(DEMO)/t5
	$(PY) -m model.text build --t5 $(DEMO)/t5 --captions $(DEMO)/shards --out $(DEMO)/text_cache --max-length 64

demo: demo-data
	$(PY) -m pipeline.tools.inspect $(DEMO)/shards/train/64x128_t9/shard-000000.tar \
	    --dataroot $(DEMO)/nuscenes --png $(DEMO)/preview.png > /dev/null
	$(PY) -m train.train --config demo --data-root $(DEMO)/shards \
	    --text-cache $(DEMO)/text_cache --out $(DEMO)/run --steps $(DEMO_STEPS) --overwrite \
	    --vae $(DEMO)/tiny-cogvae --set sample_every=$(DEMO_STEPS)
	$(PY) -m train.sample --ckpt $(DEMO)/run --vae $(DEMO)/tiny-cogvae --out $(DEMO)/sample --bucket 64x128_t9
	@echo "demo: shards in $(DEMO)/shards (README.md = dataset card), preview $(DEMO)/preview.png,"
	@echo "      training log $(DEMO)/run/log.jsonl (TensorBoard: $(DEMO)/run/tb), clip sampled during training"
	@echo "      $(DEMO)/run/samples/, sampled clip $(DEMO)/sample (grid.mp4, contact_sheet.png)"

# The paper's three-stage recipe on the demo shards (docs/train.md): spatial-only images -> + temporal
# blocks, short clips -> every bucket; each stage starts from the last one's weights (--init-from).
# stage_check: each stage's first step starts where the previous one ended (its final weights' loss on
# that batch, within 10 %; stage 2 starts on the 64x128 image bucket).
STAGES      = $(DEMO)/stages
STAGE_ARGS  = --data-root $(DEMO)/shards --text-cache $(DEMO)/text_cache --no-progress
stages: demo-data
	rm -rf $(STAGES)
	$(PY) -m train.train --config demo_stage1 $(STAGE_ARGS) --out $(STAGES)/stage1
	$(PY) -m train.train --config demo_stage2 $(STAGE_ARGS) --out $(STAGES)/stage2 \
	    --init-from $(STAGES)/stage1
	$(PY) -m train.stage_check --prev $(STAGES)/stage1 --next $(STAGES)/stage2 --bucket 64x128_t1
	$(PY) -m train.train --config demo_stage3 $(STAGE_ARGS) --out $(STAGES)/stage3 \
	    --init-from $(STAGES)/stage2
	$(PY) -m train.stage_check --prev $(STAGES)/stage2 --next $(STAGES)/stage3
	@echo "stages: runs in $(STAGES)/stage{1,2,3} (log.jsonl, checkpoints/), checks in $(STAGES)/stage{2,3}/stage_check.json"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	@set -e; for b in bench/*.py; do case $$b in bench/_*) continue;; esac; echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(DEMO) bench/results/*.json
