# The two commands of the README:  `make demo`  and  `make test`.
# TORCH_SPEC pins the CPU build that lies on the machines' disk; override for GPUs,
# e.g.  make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO       ?= demo_out
PY          = $(VENV)/bin/python
PIP         = $(VENV)/bin/pip

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Synthetic nuScenes-format data -> scene processing -> tiny CogVAE -> shards -> tiny MVDiT -> sample video.
demo: setup
	$(PY) -m pipeline.synth --out $(DEMO)/nuscenes --scenes 2 --seconds 8 --image-size 400x225 --seed 0
	@echo "demo: synthetic dataset in $(DEMO)/nuscenes"

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	@set -e; for b in bench/*.py; do case $$b in bench/_*) continue;; esac; echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(DEMO) bench/results/*.json
