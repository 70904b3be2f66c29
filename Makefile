# Two commands on a fresh machine with only python3:
#   make demo   set up, start the server on the bundled demo tasks and run the demo client
#   make test   set up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test protos check-protos bench bench-quality clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps grpcio-tools==1.66.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evolve demo --state-dir state/demo

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rfE --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_predict.py

# Evolved system vs scratch / fine-tuned ViTs and classical baselines (about an hour on 2 cores).
bench-quality: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_quality.py --baseline-cache bench/.cache

clean:
	rm -rf $(VENV) state build *.egg-info
