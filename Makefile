# Two entry points do all the set-up on a fresh machine (see README.md):
#   make demo   — the whole pipeline on the bundled corpus, CPU only
#   make test   — lint + the test suite
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo serve-demo test lint bench-cpu clean

setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/megapairs run --config configs/tiny.yaml

# From the demo's run to a running endpoint: align the packaged towers on its captions, train
# MMRet on its triplets, embed the bundled corpus as the gallery, serve it on 127.0.0.1:8000
# (Ctrl-C stops it).
serve-demo: demo
	$(BIN)/megapairs train --config configs/align-demo.yaml
	$(BIN)/megapairs train --config configs/train-demo.yaml
	$(BIN)/megapairs gallery --config configs/gallery-tiny.yaml
	$(BIN)/megapairs serve --config configs/serve-tiny.yaml

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench-cpu: setup
	$(BIN)/python benchmarks/embed_cpu.py --images 4000 --repeats 3 \
		--out benchmarks/results/cpu-2core/embed_ray_vs_loop.json

clean:
	rm -rf runs data/bench
