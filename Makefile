# corrflow: everything a fresh machine needs is installed by these targets (see README Quickstart).
PYTHON ?= python3
VENV   ?= .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean

# (Re)install when pyproject.toml changes. pip resolves the pins in pyproject.toml (docs/STACK.md).
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "corrflow needs Python >= 3.11")'
	@# The SFTP transfer tests start a real sshd on loopback (Debian's openssh-server).
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; \
		else echo "note: install openssh-server for the SFTP transfer tests"; fi; }
	@# The TLS test puts Debian's caddy in front of the servers, as the runbook's reverse proxy.
	@command -v caddy >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq caddy; \
		else echo "note: install caddy for the TLS proxy test"; fi; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: a simulated correlative experiment end to end on embedded defaults.
demo: $(STAMP)
	$(VENV)/bin/corrflow demo

## The whole test suite (slow suites included).
test: $(STAMP)
	$(VENV)/bin/python -m pytest

## The suite without the slow marker, for quick iterations.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

## Benchmarks: installs the peer libraries (benchmarks/requirements.txt, not project dependencies)
## and runs every area quickly; results in benchmarks/results/*.json.
bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -r benchmarks/requirements.txt
	for area in reconstruction registration acquisition transfer; do \
		test -f benchmarks/$$area.py && $(VENV)/bin/python -m benchmarks.$$area --quick || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache
