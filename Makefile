PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test bench lint format demo-artifacts mutation

install:
	# the same install steps as the Dockerfile: CPU torch first, then the project with its test extra
	PYTHON=$(PY) scripts/install.sh $(VENV) --test --editable

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/adapterserve serve

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/mixed.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Mutation testing of the modules that hold the promises, each against its own tests (docs/testing.md).
# Slow (about an hour on 2 cores), so not part of CI. MODULES="store/local.py ..." picks modules;
# MUTATION_ARGS passes options to scripts/mutation.py (--ref REF, --jobs N, --minutes M, --show).
mutation: install
	$(BIN)/pip install -q -e '.[test,mutation]'
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/mutation.py $(MUTATION_ARGS) $(MODULES)

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The demo tasks `make serve` seeds into an empty store: small, seeded runs on the bundled MiniLM-L6
# and the GLUE data (ADAPTERSERVE_GLUE_DIR); examples/README.md lists each one's dev metric.
DEMO_TRAIN := HF_HUB_OFFLINE=1 $(BIN)/adapterserve train --max-length 64 --seed 0 --threads 1

demo-artifacts: install
	$(DEMO_TRAIN) --glue SST-2 --method compacter --label-names negative,positive \
		--max-train-examples 2000 --epochs 2 --out examples/sst2 --task sst2
	$(DEMO_TRAIN) --glue SST-2 --method tiny_attention --label-names negative,positive \
		--max-train-examples 2000 --epochs 2 --out examples/sst2-tiny --task sst2-tiny
	$(DEMO_TRAIN) --glue CoLA --method parallel --label-names unacceptable,acceptable \
		--epochs 3 --out examples/cola --task cola
	$(DEMO_TRAIN) --glue MRPC --method lora --label-names not_equivalent,equivalent \
		--epochs 2 --lr 2e-3 --out examples/mrpc --task mrpc
	$(DEMO_TRAIN) --glue STS-B --method prefix --epochs 2 --lr 1e-2 --out examples/stsb --task stsb
	$(DEMO_TRAIN) --glue STS-B --task-type embedding --method lora --max-train-examples 2000 \
		--epochs 1 --max-dev-examples 500 --out examples/stsb-embed --task stsb-embed
	# the hypernetwork demo: a small Hyperformer++ over three tasks; two of its tasks are served
	rm -rf .demo-hyper
	HF_HUB_OFFLINE=1 $(BIN)/adapterserve train-hyper --glue SST-2,MRPC,STS-B --name glue-mini \
		--bottleneck-dim 8 --layer-embedding-dim 16 --site-embedding-dim 8 --hidden-dim 64 --projected-dim 16 \
		--steps 600 --max-train-examples 4000 --max-dev-examples 400 --max-length 64 --seed 0 --threads 1 \
		--label-names SST-2=negative,positive --label-names MRPC=not_equivalent,equivalent --out .demo-hyper
	rm -rf examples/hypernetworks/glue-mini examples/sst2-hyper examples/stsb-hyper
	mkdir -p examples/hypernetworks
	mv .demo-hyper/hypernetworks/glue-mini examples/hypernetworks/glue-mini
	mv .demo-hyper/sst-2 examples/sst2-hyper
	mv .demo-hyper/sts-b examples/stsb-hyper
	rm -rf .demo-hyper
