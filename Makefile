# p2pfiles: `make` creates .venv and installs the project into it (a real,
# non-editable install, so twistd finds the plugin exactly as a user's
# install does); `make demo` and `make test` build on that.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SOURCES := $(shell find p2pfiles twisted -name '*.py') setup.py pyproject.toml README.md

.PHONY: all demo test bench news check-news check-systemd clean

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

# The systemd unit as the README installs it, with this checkout's virtualenv
# in place of /opt/p2pfiles/.venv: systemd-analyze must accept it without a
# word (it reports some mistakes as warnings and still exits 0).
check-systemd: all
	@if ! command -v systemd-analyze > /dev/null 2>&1; then \
		echo "check-systemd: skipped: systemd-analyze is not installed (apt-get install systemd)"; \
		exit 0; \
	fi; \
	dir=$$(mktemp -d) && \
	sed 's#/opt/p2pfiles/.venv#$(abspath $(VENV))#g' docs/p2pfiles@.service > "$$dir/p2pfiles@.service" && \
	systemd-analyze verify "$$dir/p2pfiles@2.service" > "$$dir/report" 2>&1; \
	status=$$?; cat "$$dir/report"; \
	if [ $$status -eq 0 ] && [ ! -s "$$dir/report" ]; then echo "check-systemd: the unit is valid"; \
	else echo "check-systemd: the unit has problems (above)"; status=1; fi; \
	rm -rf "$$dir"; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
