# vold-pl: `make quickstart` runs the offline VOLD recipe on tiny models; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ART ?= artifacts
# The CPU wheel of torch is pinned here, not in the package metadata (which keeps a range).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv artifacts quickstart toy-pretrained test lint mutate clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The data and the tiny models (whose tokenizer is trained on the generator's text) are rebuilt when their
# generator changes, e.g. a new trace format; perception_train.jsonl is the target, so data from before it
# existed is rebuilt too. The same generator and seed give the same bytes.
$(ART)/data/perception_train.jsonl: $(VENV)/.installed vold_pl/data/synthetic.py
	$(PY) -m vold_pl.data.synthetic --out $(ART)/data --seed 0 --n-train 2000 --n-val 200 --n-test 400 --n-teacher-text 30000 \
	    --n-perception 20000 --n-rl 4000

$(ART)/tiny/student/config.json: $(ART)/data/perception_train.jsonl vold_pl/toy/tiny.py
	$(PY) -m vold_pl.toy.tiny --out $(ART)/tiny --seed 0

artifacts: $(ART)/tiny/student/config.json

quickstart: artifacts
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m vold_pl.quickstart --artifacts $(ART)

# The toy world's pretrained models, shipped in vold_pl/toy/pretrained: stage 1 of the quickstart on seed 0 (the
# teacher's SFT beside the student's perception stage, 9-12 min on 2 cores). Remake them after a change of the
# generator, the tiny models or configs/quickstart/sft_{teacher,perception}.yaml: the quickstart says when the shipped
# ones no longer match, and trains its own until then.
toy-pretrained: artifacts
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m vold_pl.quickstart --artifacts $(ART) --save-pretrained

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

# Lint the package (rules in pyproject.toml [tool.ruff]; ruff comes with the dev extra). .ci/run runs it first.
lint: venv
	$(VENV)/bin/ruff check vold_pl

# Mutation testing of the loss, reward, collation and checkpoint code (configured in pyproject.toml [tool.mutmut]);
# hours of CPU, so not part of `make test` or CI. MUTANTS narrows it, e.g. MUTANTS='vold_pl.rl.losses*'.
# Results persist in mutants/ (a rerun only tests new or changed mutants); docs/testing.md has the scores.
MUTANTS ?=
MUTATE_JOBS ?= 1
mutate: venv
	$(PY) -m pip install -q -e ".[mutate]"
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VOLD_PL_TEST_FIXTURE_CACHE=$(CURDIR)/mutants/.fixtures \
	    $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results --all true > mutants/results.txt
	$(PY) tools/mutation_score.py mutants/results.txt docs/testing.md

clean:
	rm -rf $(ART) runs
