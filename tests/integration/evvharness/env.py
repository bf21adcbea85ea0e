"""What the tests run: the one place that reads OPENSIPS_SRC and EVV_MODULE
from the environment, and the check that they are there.

OPENSIPS_SRC  built OpenSIPS tree (default: the newest release `make opensips`
              built, <repo>/.opensips/4.0.1)
EVV_MODULE    event_virtual.so under test (default <repo>/event_virtual.so);
              EVV_MODULE=$OPENSIPS_SRC/modules/event_virtual/event_virtual.so
              runs the suite against the C module.
"""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

OPENSIPS_SRC = Path(os.environ.get("OPENSIPS_SRC", str(REPO_ROOT / ".opensips" / "4.0.1")))
EVV_MODULE = Path(os.environ.get("EVV_MODULE", str(REPO_ROOT / "event_virtual.so")))

# the transports and the MI every test server loads
NEEDED_MODULES = ("event_datagram", "event_flatstore", "event_stream", "mi_datagram")


def check_prerequisites(module=EVV_MODULE, extra_modules=()):
    """Fail (never skip) with a message that says what to build or set."""
    binary = OPENSIPS_SRC / "opensips"
    problems = []
    if not binary.is_file():
        problems.append(
            f"OpenSIPS binary {binary} not found: run the tests with `make test` (it "
            f"builds the supported releases) or set OPENSIPS_SRC to a built OpenSIPS tree")
    for mod in (*NEEDED_MODULES, *extra_modules):
        so = OPENSIPS_SRC / "modules" / mod / f"{mod}.so"
        if binary.is_file() and not so.is_file():
            problems.append(f"{so} not found: build it (`make modules module={mod}` in "
                            f"{OPENSIPS_SRC}; event_rabbitmq needs librabbitmq-dev)")
    if not Path(module).is_file():
        problems.append(
            f"module under test {module} not found: run `make` in {REPO_ROOT} "
            f"or set EVV_MODULE to an event_virtual.so")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
