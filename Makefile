# Two entry points: `make demo` and `make test`. Each sets itself up on a fresh Debian machine that
# has only Python 3.11 and apt, and skips finished set-up on a second run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup clean image

setup: $(STAMP) $(FMNIST)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,export,trackers]'
	touch $@

$(FMNIST):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing and apt-get is not available: install Debian's dataset-fashion-mnist"; exit 1; \
	fi

# The dashboard's browser test drives Debian's chromium (Playwright's own browser download is not used).
$(CHROMIUM):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; \
	else \
		echo "chromium is missing and apt-get is not available: install Debian's chromium"; exit 1; \
	fi

demo: setup
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m selfsup demo

# --durations: every log names the slowest tests, against the suite's 20 minutes on 2 cores.
test: setup $(CHROMIUM)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

# The container image for clusters (infra/docker/Dockerfile): VARIANT=cuda (default) or cpu.
# Needs Docker; not part of `make test`.
VARIANT ?= cuda
image:
	docker build -f infra/docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t selfsup:0.1.0-$(VARIANT) .

clean:
	rm -rf $(VENV) build *.egg-info
