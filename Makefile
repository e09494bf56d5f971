# Developer entry points. `make quickstart` and `make test` work on a fresh Debian/Ubuntu machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned so that nothing pulls a multi-GB CUDA build by accident;
# on a GPU machine, install the torch build that matches your CUDA instead (TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
DS_SPEC ?= deepspeed==0.19.8

.PHONY: setup quickstart cpt-example test test-fast lint schema manifests golden bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	# DeepSpeed ships only an sdist; building it against the installed torch avoids pulling another torch.
	$(PIP) install -q --no-build-isolation "$(DS_SPEC)"
	$(PIP) install -q -e ".[train,slurm,k8s,dev]"
	touch $@

quickstart: setup
	$(VENV)/bin/ftcluster submit examples/quickstart.yaml --wait

# Continual pre-training on a generated 20 MB case-law corpus: prepared once, then streamed (docs/data.md).
cpt-example: setup
	$(PY) examples/cpt/make_corpus.py out/cpt/raw --mb 20
	$(VENV)/bin/ftcluster prepare-data examples/cpt-domain.yaml
	$(VENV)/bin/ftcluster submit examples/cpt-domain.yaml --wait

test: setup
	bash .ci/test.sh

lint: setup
	$(VENV)/bin/ruff check ftcluster tests benchmarks

manifests: setup
	$(PY) manifests/generate.py

schema: setup
	$(VENV)/bin/ftcluster schema -o docs/ftcluster.schema.json
	$(VENV)/bin/ftcluster schema --pipeline -o docs/ftcluster-pipeline.schema.json

golden: setup
	$(PY) -m pytest -q tests/unit/render/test_golden.py --update-golden

bench: setup
	$(PY) benchmarks/render_speed.py

clean:
	rm -rf $(VENV) out .pytest_cache

# The offline tier: tests/unit without live services or slow cases (under a minute); `make test` runs everything.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit -m "not slow and not slurm and not k8s and not s3 and not ssh"
