# The two commands of the README's quick start, and what they need. Each sets itself up.
# `make install` puts sockd on a host (README: "Running under systemd").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint compiled compiled-test bench bench-footprint wheel install uninstall clean

run: $(STAMP)
	$(BIN)/sockd -c config/sockd.yaml

# The soak test runs on its own after the rest: its minute of load would crowd the others.
test: $(STAMP) lint
	$(BIN)/pytest -n 4 -m "not soak"
	$(BIN)/pytest -m soak

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sockd sockd_bench bench tests deploy/grafana

# The hot path compiled with mypyc, into a throwaway build/mypyc (a copy of sockd/ with each of
# these modules' .so beside its .py), and the tests of those modules run against it, PYTHONPATH
# first and from inside the build, so that the daemon they start (`python -m sockd` puts the working
# directory first) and its fork server and workers import it too. Shipping it comes later: here it
# must compile and pass. conftest.py stops a run that imported any of them as Python. The copy has
# no pyproject.toml (the setup.py mypyc runs would take it for its own project's): mypy's settings
# (strict, the pydantic plugin) are given with --config-file.
MYPYC_MODULES := sockd/lifecycle.py sockd/handlers.py sockd/limits.py sockd/counters.py sockd/relay/__init__.py sockd/tls/layer.py sockd/proxy/reading.py sockd/proxy/stage.py
COMPILED_TESTS := tests/test_lifecycle.py tests/test_handlers.py tests/test_limits.py tests/test_resource_bounds.py tests/test_relay*.py tests/test_tls.py tests/test_tls_layer.py tests/test_tls_stage.py tests/test_proxy*.py
MYPYC_BUILD := $(CURDIR)/build/mypyc

compiled: $(STAMP)
	rm -rf $(MYPYC_BUILD)
	mkdir -p $(MYPYC_BUILD)
	cp -r sockd $(MYPYC_BUILD)/
	cd $(MYPYC_BUILD) && $(CURDIR)/$(BIN)/mypyc --config-file $(CURDIR)/pyproject.toml $(MYPYC_MODULES)

compiled-test: compiled
	cd $(MYPYC_BUILD) && PYTHONPATH=$(MYPYC_BUILD) SOCKD_EXPECT_COMPILED="$(MYPYC_MODULES)" \
		$(CURDIR)/$(BIN)/pytest -n 4 $(addprefix $(CURDIR)/,$(COMPILED_TESTS))

# The performance tables (minutes; not part of `make test`): see sockd_bench/suite.py. bench/compare.py
# builds the C peers and load generators into build/bench first. A quick check that it all runs:
# make bench BENCH_ARGS="--rounds 1 --seconds 1 tcp-echo"
bench: $(STAMP)
	$(BIN)/python -m sockd_bench.suite $(BENCH_ARGS)

# Memory and start-up alone (a few minutes; no C peers needed): see sockd_bench/footprint.py.
bench-footprint: $(STAMP)
	$(BIN)/python -m sockd_bench.footprint

# A wheel in dist/, for `pipx install dist/sockd-*.whl`.
wheel: $(STAMP)
	$(BIN)/python -m build --wheel --outdir dist .

# `make install` (as root): sockd in a virtualenv of its own under PREFIX, as sockd is on no
# package index and Debian's pydantic and structlog are too old; the unit, pointed at PREFIX;
# a config for the unit, unless the host has one. Running it again upgrades sockd in place.
# Packagers stage with DESTDIR (and UNITDIR=/lib/systemd/system).
PREFIX ?= /opt/sockd
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
# The unit's ProtectHome= hides /home and /root: the virtualenv's Python must live elsewhere.
INSTALL_PYTHON ?= /usr/bin/python3
# The unit reads /etc/sockd whatever PREFIX is (ConfigurationDirectory=sockd).
CONFIG := $(DESTDIR)/etc/sockd/sockd.yaml
# Where the virtualenv is built; normalised as venv writes it, so that the rewrite below finds it.
STAGE = $(abspath $(DESTDIR)$(PREFIX))

install:
	$(INSTALL_PYTHON) -m venv $(STAGE)
	$(STAGE)/bin/pip install --quiet .
# A virtualenv runs where it was made: one built under DESTDIR must name PREFIX alone, in its
# scripts' shebangs, activate scripts and pyvenv.cfg, and in the source paths of its .pyc files.
	set -e; if [ -n "$(DESTDIR)" ]; then \
		grep -rlIF '$(STAGE)' $(STAGE)/bin $(STAGE)/pyvenv.cfg | xargs -r sed -i 's|$(STAGE)|$(PREFIX)|g'; \
		$(STAGE)/bin/python -m compileall -q -f -s '$(abspath $(DESTDIR))' -p / $(STAGE)/lib >/dev/null; \
	fi
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	ln -sfn $(PREFIX)/bin/sockd $(DESTDIR)$(BINDIR)/sockd
	sed 's|/opt/sockd/|$(PREFIX)/|g' systemd/sockd.service >$(DESTDIR)$(UNITDIR)/sockd.service
	install -m 0644 systemd/sockd.socket $(DESTDIR)$(UNITDIR)/sockd.socket
# World-readable: the unit runs sockd as a dynamic user. One already there is the host's own.
	[ -e $(CONFIG) ] || install -D -m 0644 config/host.yaml $(CONFIG)

# Leaves /etc/sockd, the host's config, as removing a package (not purging it) would. Only a
# virtualenv is removed: a PREFIX that is not one is left as it is.
uninstall:
	rm -f $(DESTDIR)$(UNITDIR)/sockd.service $(DESTDIR)$(UNITDIR)/sockd.socket $(DESTDIR)$(BINDIR)/sockd
	[ ! -f $(STAGE)/pyvenv.cfg ] || rm -rf $(STAGE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info build dist

# The container image (deploy/Containerfile), built with no registry and no network: its base is
# Debian 12's minbase with python3-venv, by mmdebstrap from the host's Debian mirror, imported into
# podman as BASE_IMAGE; its Python packages are `make wheelhouse`'s. The base's tarball is kept in
# build/, one a day (the Debian archive moves daily; snapshot.debian.org is out of reach here).
# PODMAN: Debian 12's default runtime, crun 1.8, refuses a host whose cgroup v2 hierarchy, mounted
# beside v1, holds a controller ("cgroups in hybrid mode not supported"), as these machines' does;
# runc runs on both kinds.
.PHONY: base-image image
PODMAN ?= podman --runtime runc
IMAGE ?= localhost/sockd
BASE_IMAGE ?= localhost/debian-python:bookworm
BASE_TARBALL ?= build/debian-python-bookworm-$(shell date -u +%Y%m%d).tar

$(BASE_TARBALL):
	mkdir -p $(dir $@)
	mmdebstrap --quiet --format=tar --variant=minbase --include=python3-venv bookworm $@.part
	mv $@.part $@

base-image: $(BASE_TARBALL)
	$(PODMAN) import --quiet $(BASE_TARBALL) $(BASE_IMAGE)

# --format docker: an OCI image has no HEALTHCHECK.
image: base-image wheelhouse
	$(PODMAN) build --quiet --format docker --build-arg BASE=$(BASE_IMAGE) -f deploy/Containerfile -t $(IMAGE) .
