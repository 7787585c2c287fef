# Two commands for a fresh machine: `make bench` (the main job) and `make test`.
# `make setup` is what both run first; it is quick when .venv already matches.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genbench-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# OpenMP threads that spin-wait make a busy 2-core machine several times slower: passive
# waiting everywhere, and one thread per process for the tests.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup bench test mutate fashion-mnist slurm clean

setup: $(STAMP) fashion-mnist

# Reinstalls only when the declared dependencies or the pinned set change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST offline from Debian's package when we may install it; otherwise say how.
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ] || [ -n "$$GENBENCH_DATA" ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; \
	else echo "Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'," \
	  "or set GENBENCH_DATA to a directory with its IDX files, or use --download."; fi

bench: setup
	$(BIN)/bench run --suite default

# A real single-node SLURM for tests/bench/test_slurm.py: the packages when root may install
# them (GENBENCH_NO_SLURM=1 opts out); the tests start and stop their own daemons.
slurm:
	@bash tests/install_slurm.sh

# One worker per core (pytest-xdist), each test file on one worker so that a file's shared
# fixtures (the DDP suite, the toy family's runs) are built once.
test: setup slurm
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile

# Mutation testing, not part of `make test` or CI: slow, it runs tests once per mutant (config in
# pyproject.toml [tool.mutmut]; equivalent mutants in mutation-equivalents.md). A rerun only
# tests the mutants of functions whose source changed (new tests alone retest nothing);
# `rm -rf mutants` starts afresh.
SCORE = import json; s = json.load(open("mutants/mutmut-cicd-stats.json")); \
  t = s["total"] - s["skipped"]; k = s["killed"] + s["timeout"]; \
  survived, untested = s["survived"], s["no_tests"]; \
  print(f"mutation score {100 * k / max(t, 1):.1f}%: {k} of {t} mutants killed, " \
        f"{survived} survived, {untested} in code no selected test calls")
mutate: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,mutate]'
	OMP_NUM_THREADS=1 $(BIN)/mutmut run >mutants-run.log 2>&1 || { tail -30 mutants-run.log; exit 1; }
	$(BIN)/mutmut export-cicd-stats >/dev/null
	@echo "surviving mutants (mutmut show NAME prints the diff):"
	@$(BIN)/mutmut results
	@$(BIN)/python -c '$(SCORE)'

clean:
	rm -rf $(VENV) .pytest_cache mutants mutants-run.log
