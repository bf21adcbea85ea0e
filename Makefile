# event_virtual in Rust: build, test and install against OpenSIPS.
#
#   make demo                 see it work: a real OpenSIPS, receivers, a failover
#   make test                 cargo tests, then the integration tests on every
#                             supported OpenSIPS (built here first when missing)
#   make                      build ./event_virtual.so
#   make opensips             build the supported OpenSIPS releases into .opensips/
#   make bench                what the virtual layer costs, this module and the C one
#   make install              copy the module into MODULES_DIR (default: that
#                             OpenSIPS's modules folder); a module there that is
#                             not this one (the packaged C module) is kept as
#                             event_virtual.so.orig first
#   make clean
#
# OPENSIPS_SRC=/path/to/opensips   use your own OpenSIPS source tree instead of
#                                  .opensips/ (building needs only the source;
#                                  test, demo and bench need it built)
# OPENSIPS_VERSION=3.6.8           one supported release instead of all of them
#                                  (test) or the newest (everything else)
# OPENSIPS_ARCHIVES=/folder        take the release archives from there instead
#                                  of downloading them

SUPPORTED_VERSIONS := 3.4.18 3.6.8 4.0.1
NEWEST_VERSION := 4.0.1
OPENSIPS_CACHE ?= $(CURDIR)/.opensips
CARGO ?= cargo

ifneq ($(OPENSIPS_VERSION),)
ifeq ($(filter $(OPENSIPS_VERSION),$(SUPPORTED_VERSIONS)),)
$(error OpenSIPS $(OPENSIPS_VERSION) is not supported: set OPENSIPS_VERSION to one of $(SUPPORTED_VERSIONS))
endif
endif
VERSIONS := $(or $(OPENSIPS_VERSION),$(SUPPORTED_VERSIONS))

# Your own tree, or the provisioned one of OPENSIPS_VERSION (the newest when
# unset); PROVISIONED is empty when OPENSIPS_SRC names your own.
ifeq ($(OPENSIPS_SRC),)
PROVISIONED := $(or $(OPENSIPS_VERSION),$(NEWEST_VERSION))
OPENSIPS_SRC := $(OPENSIPS_CACHE)/$(PROVISIONED)
endif
override OPENSIPS_SRC := $(abspath $(OPENSIPS_SRC))
# one build folder per tree, so that switching trees does not rebuild all
export CARGO_TARGET_DIR := $(CURDIR)/target/$(notdir $(OPENSIPS_SRC))
export OPENSIPS_SRC OPENSIPS_CACHE

MODULE := event_virtual.so
BUILT := $(CARGO_TARGET_DIR)/release/libevent_virtual.so

# The tests' Python packages live in a virtual environment of their own,
# made on first use; PYTHON=python3 uses yours as it is.
PYENV := $(OPENSIPS_CACHE)/python
# The stamp names the requirements' checksum, not only their date: several
# checkouts may share one environment (OPENSIPS_CACHE), and a stamp another
# checkout touched must not hide a requirement added here.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(PYENV)/bin/python
PYDEPS := $(PYENV)/.requirements-$(firstword $(shell cksum < tests/requirements.txt))
endif

.PHONY: all build check-tree opensips provision test unit-test integration-test \
	integration-tests demo bench install clean miri

all: build

# the supported releases, built from their archives (tests/provision.sh)
opensips:
	tests/provision.sh $(OPENSIPS_CACHE) $(VERSIONS)

provision:
ifneq ($(PROVISIONED),)
	tests/provision.sh $(OPENSIPS_CACHE) $(PROVISIONED)
endif

check-tree: provision
	@test -f $(OPENSIPS_SRC)/sr_module.h -a -f $(OPENSIPS_SRC)/Makefile.defs || { \
		echo "error: OPENSIPS_SRC=$(OPENSIPS_SRC) is not an OpenSIPS source tree: set OPENSIPS_SRC to the source of your OpenSIPS version, or leave it unset to use one built here" >&2; \
		exit 1; }

build: check-tree
	$(CARGO) build --release
	@# a shared object links with symbols left for dlopen to find: make sure
	@# none of the shim<->Rust contract is among them
	@if nm -D --undefined-only $(BUILT) | grep -w 'evv_[a-z_]*'; then \
		echo "error: the symbols above are declared but not defined" >&2; exit 1; fi
	cp $(BUILT) $(MODULE)

$(PYDEPS): tests/requirements.txt
	@$(or $(shell command -v python3),python3) -m venv $(PYENV) || { \
		echo "error: cannot make a Python virtual environment: apt-get install python3-venv (or set PYTHON=python3 with the packages of tests/requirements.txt)" >&2; \
		exit 1; }
	$(PYENV)/bin/pip install -q -r tests/requirements.txt
	@touch $@

# the pure-Rust tests need no OpenSIPS, and get none
unit-test:
	env -u OPENSIPS_SRC CARGO_TARGET_DIR=$(CURDIR)/target/pure $(CARGO) test

integration-test: build $(PYDEPS)
	EVV_MODULE=$(CURDIR)/$(MODULE) $(PYTHON) -m pytest -q tests/integration

# every supported release (or OPENSIPS_VERSION's), each with the module
# built against it, all of them even when one fails, so that one run says
# where it fails; or your own tree when OPENSIPS_SRC names it
ifeq ($(PROVISIONED),)
integration-tests: integration-test
else
integration-tests: $(PYDEPS)
	tests/provision.sh $(OPENSIPS_CACHE) $(VERSIONS)
	@failed=; for v in $(VERSIONS); do \
		echo "=== integration tests on OpenSIPS $$v"; \
		$(MAKE) --no-print-directory integration-test OPENSIPS_SRC=$(OPENSIPS_CACHE)/$$v \
			|| failed="$$failed $$v"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== integration tests failed on OpenSIPS$$failed" >&2; exit 1; fi; \
	echo "=== integration tests passed on OpenSIPS $(VERSIONS)"
endif

test: unit-test integration-tests

# the shared-memory layouts (blocks, lists) under Miri, over the system
# allocator: needs a nightly toolchain with the miri and rust-src components
miri:
	env -u OPENSIPS_SRC CARGO_TARGET_DIR=$(CURDIR)/target/miri $(CARGO) +nightly miri test --lib shm::

# a real OpenSIPS, receivers, subscriptions and a failover, told as it happens
demo: build $(PYDEPS)
	EVV_MODULE=$(CURDIR)/$(MODULE) $(PYTHON) demo/demo.py

# rates and ratios: direct vs virtual, this module vs the C one when the tree has it
# built; e.g. BENCH_ARGS="--only sync,scale --rounds 3" (bench/bench.py --help)
bench: build $(PYDEPS)
	EVV_MODULE=$(CURDIR)/$(MODULE) $(PYTHON) bench/bench.py $(BENCH_ARGS)

MODULES_DIR ?= $(shell $(MAKE) -s --no-print-directory -C $(OPENSIPS_SRC) \
	-f $(CURDIR)/opensips-headers/tree.mk evv-modules-dir 2>/dev/null)

# Installing over a module that is not this one (the C module of a package)
# keeps it as $(MODULE).orig, once: rolling back is moving it back. When
# a .orig is already there, install refuses rather than lose one of them.
install: build
	@test -n "$(MODULES_DIR)" || { echo "error: cannot tell where $(OPENSIPS_SRC) installs modules: set MODULES_DIR" >&2; exit 1; }
	install -d $(MODULES_DIR)
	@dest=$(MODULES_DIR)/$(MODULE); \
	if [ -e "$$dest" ] && ! nm -D --defined-only "$$dest" 2>/dev/null | grep -qw evv_rs_init; then \
		if [ -e "$$dest.orig" ]; then \
			echo "error: $$dest is not this module and $$dest.orig exists too: move one of them away first" >&2; exit 1; \
		fi; \
		cp -p "$$dest" "$$dest.orig" && echo "kept the $(MODULE) that was there (not this module) as $$dest.orig"; \
	fi
	install -m 0755 $(MODULE) $(MODULES_DIR)/$(MODULE)

# the provisioned OpenSIPS trees stay: `rm -rf .opensips` removes them
clean:
	rm -rf target $(MODULE)
