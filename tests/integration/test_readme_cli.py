"""The README's `opensips-cli` commands, run by the real opensips-cli (the
`opensipscli` package of tests/requirements.txt) against a server, in the
README's order: each must print exactly what the README shows under it.

The commands are read from README.md itself (every `$ opensips-cli ...`
line of a fenced block, with its `\\` continuations; what follows it up to
the next `$` line or the end of the block is its output), so the README
cannot drift from what the module answers. Each runs as written, with one
`-f <config>` added that points opensips-cli at the test server's
mi_datagram socket (the README leaves that to the user's
~/.opensips-cli.cfg), and, on OpenSIPS 4.0, the command's 4.0 name from the
README's table (opensips-cli takes no other there).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evvharness import OPENSIPS_SRC, OpenSips
from evvharness.env import REPO_ROOT

README = REPO_ROOT / "README.md"
# the commands the README must show, each at least once
EXPECTED = ("event_subscribe", "event_virtual_list", "get_statistics", "event_virtual_hash",
            "event_virtual_retry")


def readme_renames(text):
    """{old name: 4.0 name} from the README's table of MI command names."""
    return dict(re.findall(r"^\| `([a-z_]+)` \| `([a-z_]+:[a-z_]+)` \|$", text, re.M))


def server_version():
    out = subprocess.run([str(OPENSIPS_SRC / "opensips"), "-V"], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"opensips (\d+)\.(\d+)\.(\d+)", out)
    assert m, f"no version in `opensips -V`: {out!r}"
    return tuple(int(x) for x in m.groups())


def readme_commands(text):
    """[(command line, expected output)] of the README's `$ opensips-cli` lines."""
    out, block, cmd, lines = [], False, None, []

    def close():
        if cmd is not None:
            out.append((cmd, "\n".join(lines).rstrip()))

    source = iter(text.splitlines())
    for line in source:
        if line.startswith("```"):
            if block:
                close()
                cmd, lines = None, []
            block = not block
            continue
        if not block:
            continue
        if line.startswith("$ "):
            close()
            cmd, lines = line[2:], []
            while cmd.endswith("\\"):
                cmd = cmd[:-1].rstrip() + " " + next(source).strip()
            if not cmd.startswith("opensips-cli "):
                cmd = None
        elif cmd is not None:
            lines.append(line)
    return out


class ReadmeServer(OpenSips):
    """A test server on which the README's events exist: the core publishes
    a script event when it reads a raise_event() of it (the modules that own
    them, pike and dialog, are not loaded)."""

    EVENTS = ("E_PIKE_BLOCKED", "E_DLG_STATE_CHANGED")

    def script(self):
        raises = "\n".join(f'    raise_event("{e}");' for e in self.EVENTS)
        return super().script() + f"\nroute[readme_events] {{\n{raises}\n}}\n"


def opensips_cli():
    """The one beside the tests' Python (the environment make test makes),
    else the one on PATH (PYTHON=python3)."""
    beside = Path(sys.executable).parent / "opensips-cli"
    found = beside if beside.is_file() else shutil.which("opensips-cli")
    if found is None:
        pytest.fail(f"opensips-cli not found (not in {beside.parent} nor on PATH): "
                    f"`pip install -r tests/requirements.txt` (make test does it)",
                    pytrace=False)
    return found


def test_readme_commands_print_what_the_readme_shows(tmp_path):
    commands = readme_commands(README.read_text())
    shown = {shlex.split(c)[3] for c, _ in commands}
    missing = [c for c in EXPECTED if c not in shown]
    assert not missing, f"README.md shows no `opensips-cli -x mi` call of {missing}"
    # OpenSIPS 4.0 names MI commands <module>:<command>, and opensips-cli
    # takes only those there: the README's table says which
    renames = readme_renames(README.read_text())
    assert {"event_subscribe", "event_virtual_list"} <= renames.keys(), \
        f"README.md's table of 4.0 command names not found: {renames}"
    on_40 = server_version() >= (4, 0, 0)
    cli = opensips_cli()
    srv = ReadmeServer(tmp_path / "opensips").start()
    try:
        cfg = tmp_path / "opensips-cli.cfg"
        cfg.write_text(f"[default]\ncommunication_type: datagram\n"
                       f"datagram_ip: 127.0.0.1\ndatagram_port: {srv.mi_port}\n"
                       f"datagram_timeout: 5\n")
        env = {**os.environ, "HOME": str(tmp_path)}
        if on_40:
            known = srv.mi("which")
            unknown = [n for n in renames.values() if n not in known]
            assert not unknown, f"README.md's 4.0 names {unknown} are not in `which`: {known}"
        for cmd, expected in commands:
            argv = shlex.split(cmd)
            assert argv[:3] == ["opensips-cli", "-x", "mi"], f"not an MI call: {cmd}"
            if on_40:
                assert argv[3] in renames, f"README.md's table has no 4.0 name for {argv[3]}"
                argv[3] = renames[argv[3]]
                cmd = shlex.join(argv)
            run = subprocess.run([str(cli), "-f", str(cfg), *argv[1:]], capture_output=True,
                                 text=True, env=env, timeout=30)
            assert run.returncode == 0, f"`{cmd}` failed ({run.returncode}):\n{run.stderr}"
            got = "\n".join(l.rstrip() for l in run.stdout.splitlines()).rstrip()
            assert got == expected, (f"`{cmd}` printed:\n{got}\n\nREADME.md shows:\n{expected}")
        srv.assert_alive("after the README's commands")
    finally:
        srv.stop()


def test_readme_parser_finds_commands_and_outputs():
    """The reader above sees continuations and outputs: a README whose
    commands it could not find would pass without running anything."""
    text = "```\n$ opensips-cli -x mi a \\\n    b c\n{\n  1\n}\n$ opensips-cli -x mi d\n```\n" \
           "```\n$ make x\nno\n```\n"
    assert readme_commands(text) == [("opensips-cli -x mi a b c", "{\n  1\n}"),
                                     ("opensips-cli -x mi d", "")]
