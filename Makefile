# The two commands of the README's quick start, and what they need. Each sets itself up.
# `make install` puts sockd on a host (README: "Running under systemd").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint compiled compiled-test bench bench-footprint wheel lock wheelhouse install uninstall deb clean

# The compiled build, as `pip install .` makes it (see `compiled`).
run: $(COMPILED)
	PYTHONPATH=$(MYPYC_BUILD) $(BIN)/sockd -c config/sockd.yaml

# The soak test runs on its own after the rest: its minute of load would crowd the others.
test: $(STAMP) lint
	$(BIN)/pytest -n 4 -m "not soak"
	$(BIN)/pytest -m soak

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy sockd sockd_bench bench tests deploy/grafana setup.py

# The hot path compiled with mypyc (sockd/build.py's HOT_MODULES, by setup.py, as `pip install .`
# compiles it) into a throwaway copy of the checkout, build/mypyc, each module's .so beside its .py;
# the whole suite then runs against it, PYTHONPATH first and from inside the build, so
# that the daemon they start (`python -m sockd` puts the working directory first) and its fork
# server and workers import it too. conftest.py stops a run that imported any of them as Python.
# The development virtualenv stays pure (setup.py compiles nothing for an editable install): an
# edit to a source file takes effect at once there, and `make test` tests the pure build.
# But for the tests that build sockd themselves (the wheel, `make install`, the upgrade's two
# installs, and the package and the image of deploy/), which test the build they make and whose
# daemons import no module of the build here: they run once, in `make test`.
BUILDS_OF_THEIR_OWN := tests/test_install.py tests/test_upgrade.py $(wildcard tests/test_deploy_debian.py tests/test_deploy_image.py)
MYPYC_BUILD := $(CURDIR)/build/mypyc

COMPILED := $(MYPYC_BUILD)/.built

compiled: $(COMPILED)

# Built again when a source changes; where no compiler is found, setup.py says so and the copy is
# pure Python.
$(COMPILED): $(STAMP) setup.py pyproject.toml $(shell find sockd -name '*.py')
	rm -rf $(MYPYC_BUILD)
	mkdir -p $(MYPYC_BUILD)
	cp -r sockd setup.py pyproject.toml README.md $(MYPYC_BUILD)/
	cd $(MYPYC_BUILD) && $(CURDIR)/$(BIN)/python setup.py --quiet build_ext --inplace
	touch $@

compiled-test: $(COMPILED)
	cd $(MYPYC_BUILD) && PYTHONPATH=$(MYPYC_BUILD) SOCKD_EXPECT_COMPILED=1 \
		$(CURDIR)/$(BIN)/pytest -n 4 -m "not soak" $(addprefix --ignore=$(CURDIR)/,$(BUILDS_OF_THEIR_OWN)) $(CURDIR)/tests

# The performance tables (minutes; not part of `make test`): see sockd_bench/suite.py. bench/compare.py
# builds the C peers and load generators into build/bench first. sockd's rows run the compiled build
# (and issue 26's rows the pure one beside it). A quick check that it all runs:
# make bench BENCH_ARGS="--rounds 1 --seconds 1 tcp-echo"
bench: $(STAMP) $(COMPILED)
	$(BIN)/python -m sockd_bench.suite $(BENCH_ARGS)

# Memory and start-up alone (a few minutes; no C peers needed): see sockd_bench/footprint.py.
bench-footprint: $(STAMP)
	$(BIN)/python -m sockd_bench.footprint

# A wheel in dist/, for `pipx install dist/sockd-*.whl`.
BUILD_WHEEL = $(BIN)/python -m build --wheel --outdir
wheel: $(STAMP)
	$(BUILD_WHEEL) dist .

# requirements.lock: every runtime dependency of pyproject.toml pinned with its hashes (for Python 3.11
# on Linux), what `make install`, the package and the image install; pyproject.toml keeps its ranges
# for those who install sockd as a library. `make lock` takes in a change of pyproject.toml and keeps
# the pins that still fit it; `make lock LOCK_ARGS=--upgrade` moves every pin to its newest release.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links $(LOCK_ARGS) --output-file requirements.lock pyproject.toml

# An offline install: sockd's wheel and the wheels of the locked releases (checked against the lock's
# hashes), for `make install WHEELHOUSE=dir` on a host that reaches no package index. Wheels only,
# as building an sdist would need setuptools from the index: for this machine's Python and platform.
wheelhouse: $(STAMP)
	$(BIN)/pip download --quiet --require-hashes --only-binary=:all: -r requirements.lock -d $(or $(WHEELHOUSE),dist/wheelhouse)
	$(BUILD_WHEEL) $(or $(WHEELHOUSE),dist/wheelhouse) .

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
# WHEELHOUSE=dir (`make wheelhouse`): install from it alone, sockd's wheel included, with no index.
FROM_WHEELHOUSE = $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))
# Where the virtualenv is built; normalised as venv writes it, so that the rewrite below finds it.
STAGE = $(abspath $(DESTDIR)$(PREFIX))

install:
	$(INSTALL_PYTHON) -m venv $(STAGE)
# The locked releases, each checked against its hash; then sockd alone, whose dependencies they are
# (reinstalled: a wheelhouse's sockd may be a new build of the version installed).
	$(STAGE)/bin/pip install --quiet --require-hashes $(FROM_WHEELHOUSE) -r requirements.lock
	$(STAGE)/bin/pip install --quiet --no-deps --force-reinstall $(FROM_WHEELHOUSE) $(if $(WHEELHOUSE),sockd,.)
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

# `make deb`: dist/sockd_<version>_<arch>.deb, by dpkg-deb from what `make install` stages, with
# deploy/debian/'s metadata (debhelper would only wrap the same install). DEB_VERSION overrides
# the version (a rebuild, a test's upgrade). The virtualenv's interpreter is INSTALL_PYTHON,
# whose minor version it needs: the package depends on that one (Debian's python3 of today).
DEB_VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' sockd/__init__.py)
DEB_DIR ?= dist
# Where the package's tree is staged (emptied first).
DEB_ROOT ?= build/deb
DEB_MAINTAINER ?= sockd maintainers <maintainers@users.noreply.r-seed-fe7f19de.example>
DEB_PYTHON = $(shell $(INSTALL_PYTHON) -c 'import sys; print("python3 (>= 3.{0}), python3 (<< 3.{1})".format(sys.version_info[1], sys.version_info[1] + 1))')
# And on the C library, from the newest glibc symbol version its compiled modules name.
DEB_LIBC = $$(find $(DEB_ROOT) -name '*.so' -exec objdump -T {} + | sed -n 's/.*GLIBC_\([0-9.]*\).*/\1/p' | sort -V | tail -1)
DEB_DOC = $(DEB_ROOT)/usr/share/doc/sockd
DEB_FILL = sed -e 's|@VERSION@|$(DEB_VERSION)|' -e 's|@MAINTAINER@|$(DEB_MAINTAINER)|'

deb:
	rm -rf $(DEB_ROOT)
	$(MAKE) install DESTDIR=$(abspath $(DEB_ROOT)) PREFIX=/opt/sockd BINDIR=/usr/bin UNITDIR=/lib/systemd/system
# The bytecode is postinst's to write, as for Debian's python3- packages.
	find $(DEB_ROOT) -depth -name __pycache__ -type d -exec rm -rf {} +
	install -d $(DEB_ROOT)/DEBIAN $(DEB_DOC)
	install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm $(DEB_ROOT)/DEBIAN/
	echo /etc/sockd/sockd.yaml >$(DEB_ROOT)/DEBIAN/conffiles
	install -m 0644 deploy/debian/copyright $(DEB_DOC)/copyright
	$(DEB_FILL) -e "s|@DATE@|$$(git log -1 --format=%aD 2>/dev/null || date -R)|" deploy/debian/changelog | gzip -9n >$(DEB_DOC)/changelog.gz
	install -D -m 0644 deploy/debian/lintian-overrides $(DEB_ROOT)/usr/share/lintian/overrides/sockd
	$(DEB_FILL) -e 's|@ARCH@|$(shell dpkg --print-architecture)|' -e "s|@DEPENDS@|$(DEB_PYTHON), libc6 (>= $(DEB_LIBC))|" \
		-e "s|@SIZE@|$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1)|" deploy/debian/control >$(DEB_ROOT)/DEBIAN/control
# For `dpkg --verify` (and debsums), as dh_md5sums writes it: every file but the conffile, whose sum dpkg keeps.
	cd $(DEB_ROOT) && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
		| xargs -0 md5sum >DEBIAN/md5sums
	mkdir -p $(DEB_DIR)
	dpkg-deb --root-owner-group --build $(DEB_ROOT) $(DEB_DIR)/sockd_$(DEB_VERSION)_$(shell dpkg --print-architecture).deb

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

# --format docker: an OCI image has no HEALTHCHECK. --layers=false: no layer cache, as the
# wheelhouse's sockd wheel is new at each build, so that its layers would never be used again, only
# left behind (the builder stage's above all) as unnamed images.
image: base-image wheelhouse
	$(PODMAN) build --quiet --layers=false --format docker --build-arg BASE=$(BASE_IMAGE) -f deploy/Containerfile -t $(IMAGE) .
