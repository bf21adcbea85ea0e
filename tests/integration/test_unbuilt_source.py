"""The module builds from a release source that was never configured or
built, as an operator with a packaged OpenSIPS has it, and that module loads
into a server of the same release and delivers.

The bare source is the release archive `make opensips` kept
(OPENSIPS_CACHE/archives) or the one in OPENSIPS_ARCHIVES when either has
it; otherwise (your own tree, `make test OPENSIPS_SRC=...`, and no archive)
a copy of OPENSIPS_SRC without what building it made. The server is
OPENSIPS_SRC's.
"""

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from evvharness import OPENSIPS_SRC, raise_one, virtual
from evvharness.env import REPO_ROOT


def _release():
    out = subprocess.run([str(OPENSIPS_SRC / "opensips"), "-V"], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"opensips (\d+\.\d+\.\d+)", out)
    assert m, f"no version in `opensips -V`: {out!r}"
    return m.group(1)


# what building an OpenSIPS tree adds to its release source: left out of
# the copy of a tree that has no release archive beside it
BUILD_PRODUCTS = ("*.o", "*.d", "*.so", "*.a", "*.pyc", "Makefile.conf", "cfg.tab.c",
                  "cfg.tab.h", "lex.yy.c", ".git")


def _archive(version):
    name = f"opensips-{version}.tar.gz"
    places = [Path(os.environ["OPENSIPS_ARCHIVES"])] if os.environ.get("OPENSIPS_ARCHIVES") else []
    places.append(Path(os.environ.get("OPENSIPS_CACHE", REPO_ROOT / ".opensips")) / "archives")
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    return None


def _bare_source(version, dest):
    """(the unbuilt source of `version` under dest, where it came from)."""
    tree = dest / f"opensips-{version}"
    archive = _archive(version)
    if archive is not None:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        return tree, str(archive)
    # no archive: the tree under test, without its build products
    products = shutil.ignore_patterns(*BUILD_PRODUCTS)

    def ignore(folder, names):
        skip = set(products(folder, names))
        if Path(folder).resolve() == OPENSIPS_SRC.resolve():
            skip.add("opensips")           # the binary
        return skip
    shutil.copytree(OPENSIPS_SRC, tree, ignore=ignore, symlinks=True)
    return tree, f"a copy of {OPENSIPS_SRC} without its build products"


def test_module_from_unbuilt_release_source_loads_and_delivers(make_srv, recv, tmp_path):
    version = _release()
    tree, origin = _bare_source(version, tmp_path)
    generated = ("Makefile.conf", "opensips", "main.o")
    assert not any((tree / f).exists() for f in generated), f"{origin} is not a bare source"

    # the README's command, as an operator runs it (not under this make)
    module = tmp_path / "event_virtual.so"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CARGO_TARGET_DIR")}
    build = subprocess.run(["make", "-C", str(REPO_ROOT), "build", f"OPENSIPS_SRC={tree}",
                            f"MODULE={module}"], env=env, capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, f"make OPENSIPS_SRC={tree} failed:\n{build.stderr[-3000:]}"
    # the build read the tree's definitions and changed nothing in it
    assert not any((tree / f).exists() for f in generated), "building the module built OpenSIPS"

    # a module whose version or compile flags differ is refused at start-up
    # (a tree configured with other flags than its Makefile.conf.template's
    # needs its release archive: OPENSIPS_ARCHIVES)
    srv = make_srv(module=module)
    subs = [recv.dead(), recv.udp()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))
    for i in range(3):
        assert raise_one(srv, ev, i, subs, timeout=3) == [1]
    listed = srv.virtual_list(ev)
    assert [s["policy"] for s in listed] == ["FAILOVER"]
