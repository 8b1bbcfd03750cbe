# Two entry points for a fresh machine (see README):
#   make demo   set up, then run the embedded demo (no download)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,flower,hf,tracking,dp]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rankfed demo

test: setup
	$(PY) -m pytest tests --durations=15

clean:
	rm -rf $(VENV) runs build src/*.egg-info
