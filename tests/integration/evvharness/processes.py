"""The processes a test run starts (OpenSIPS, the RabbitMQ broker): each in
a process group of its own, stopped group-wide, and killed with the run."""

import ctypes
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def die_with_parent():
    """For preexec_fn, in the child before exec: no core files, and SIGTERM
    when the run that started it dies before its teardown (a timeout, ^C
    twice); the bench's processes use it too."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv, log_path, cwd, env=None):
    """Start argv in a new session (its process group id is its pid), stdin
    closed, stdout and stderr appended to log_path."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [str(a) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent)


def group_alive(pgid):
    """Some member of process group pgid runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg; look for live members
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_group(proc, term_grace=5.0, kill_grace=5.0):
    """SIGTERM to the process group spawn() started, SIGKILL to what is left
    after term_grace; returns once the group is gone (or kill_grace is over)
    and the leader is reaped."""
    pgid = proc.pid
    for sig, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, kill_grace)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if not group_alive(pgid):
                break
            time.sleep(0.02)
        else:
            continue
        break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
