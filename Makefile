# Everything needed on a fresh machine with Python 3.10+ and pip:
#   make demo   build a demo dataset from sample photos and print where it is
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-out

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m controlset sample-photos $(DEMO)/photos
	$(PY) -m controlset annotate $(DEMO)/photos -o $(DEMO)/shards --annotators canny,hough --shard-size 8
	$(PY) -m controlset validate $(DEMO)/shards
	$(PY) -m controlset preview $(DEMO)/shards -o $(DEMO)/preview.png -n 8
	@echo
	@echo "shards:  $(DEMO)/shards/shard-*.tar (stats.json, failures.parquet beside them)"
	@echo "preview: $(DEMO)/preview.png"

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests

clean:
	rm -rf $(VENV) $(DEMO)
