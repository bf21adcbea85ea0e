# event_virtual in Rust: build, test and install against an OpenSIPS tree.
#
#   make                      build ./event_virtual.so
#   make test                 cargo tests, then the integration tests
#   make bench                what the virtual layer costs, this module and the C one
#   make install              copy it into that OpenSIPS's modules folder
#   make clean
#
# OPENSIPS_SRC names a configured and built OpenSIPS source tree.

OPENSIPS_SRC ?= /usr/local/src/opensips
PYTHON ?= python3
CARGO ?= cargo

override OPENSIPS_SRC := $(abspath $(OPENSIPS_SRC))
TREE_OK := $(and $(wildcard $(OPENSIPS_SRC)/sr_module.h),$(wildcard $(OPENSIPS_SRC)/opensips))
# one build folder per tree, so that switching trees does not rebuild all
TREE_NAME := $(notdir $(realpath $(OPENSIPS_SRC)))
export CARGO_TARGET_DIR := $(CURDIR)/target/$(or $(TREE_NAME),none)
export OPENSIPS_SRC

MODULE := event_virtual.so
BUILT := $(CARGO_TARGET_DIR)/release/libevent_virtual.so

.PHONY: all check-tree build test unit-test integration-test bench install clean

all: build

check-tree:
ifeq ($(TREE_OK),)
	@echo "error: no built OpenSIPS tree at OPENSIPS_SRC=$(OPENSIPS_SRC): set OPENSIPS_SRC to a configured and built OpenSIPS source tree (make OPENSIPS_SRC=/path/to/opensips)" >&2
	@exit 1
endif

build: check-tree
	$(CARGO) build --release
	@# a shared object links with symbols left for dlopen to find: make sure
	@# none of the shim<->Rust contract is among them
	@if nm -D --undefined-only $(BUILT) | grep -w 'evv_[a-z_]*'; then \
		echo "error: the symbols above are declared but not defined" >&2; exit 1; fi
	cp $(BUILT) $(MODULE)

unit-test:
	$(CARGO) test

integration-test: build
	EVV_MODULE=$(CURDIR)/$(MODULE) $(PYTHON) -m pytest -q tests/integration

test: unit-test integration-test

# rates and ratios: direct vs virtual, this module vs the C one when the tree has it
# built; e.g. BENCH_ARGS="--only sync,scale --rounds 3" (bench/bench.py --help)
bench: build
	EVV_MODULE=$(CURDIR)/$(MODULE) $(PYTHON) bench/bench.py $(BENCH_ARGS)

MODULES_DIR ?= $(shell $(MAKE) -s --no-print-directory -C $(OPENSIPS_SRC) \
	-f $(CURDIR)/opensips-headers/tree.mk evv-modules-dir 2>/dev/null)

install: build
	@test -n "$(MODULES_DIR)" || { echo "error: cannot tell where $(OPENSIPS_SRC) installs modules: set MODULES_DIR" >&2; exit 1; }
	install -d $(MODULES_DIR)
	install -m 0755 $(MODULE) $(MODULES_DIR)/$(MODULE)

clean:
	rm -rf target $(MODULE)
