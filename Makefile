# p2pfiles: `make` creates .venv and installs the project into it (a real,
# non-editable install, so twistd finds the plugin exactly as a user's
# install does); `make demo` and `make test` build on that.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := $(shell find p2pfiles twisted -name '*.py') setup.py pyproject.toml README.md

.PHONY: all demo test bench news check-news clean

all: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check ".[dev]"
	@# The plugin must be visible to twistd from anywhere, not only from here.
	cd / && $(abspath $(BIN))/twistd p2pfiles --help > /dev/null
	touch $@

demo: all
	$(BIN)/p2pfiles demo $(DEMO_ARGS)

test: all
	@# -m puts this checkout first on the path, so the tests run its code.
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests

bench: all
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# NEWS is built from newsfragments/ by towncrier; `make check-news` fails if
# the committed NEWS is not what the fragments build.
news: all
	$(BIN)/python tools/build_news.py > NEWS

check-news: all
	$(BIN)/python tools/build_news.py | diff -u NEWS - && echo "NEWS is current"

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
