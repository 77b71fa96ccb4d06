# The two commands of the README:  make quickstart  |  make test
# Both set everything up on a fresh machine: a virtual environment with calibjax, and Fashion-MNIST.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
TEST_WORKERS ?= 2

.PHONY: setup data quickstart test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $@

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (no download at run time).
data:
	@if [ -n "$$CALIBJAX_FASHION_MNIST_DIR" ] || [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  exit 0; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR): install the Debian package dataset-fashion-mnist," \
	       "or set CALIBJAX_FASHION_MNIST_DIR to a directory holding its IDX files" >&2; \
	  exit 1; \
	fi

quickstart: setup data
	$(PYTHON) -m calibjax.main --config configs/quickstart.py --workdir runs/quickstart

test: setup data
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean:
	rm -rf runs .pytest_cache
