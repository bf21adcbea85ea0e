"""The processes a test run starts (OpenSIPS, the RabbitMQ broker): each in
a process group of its own, stopped group-wide, and killed with the run."""

import ctypes
import os
import resource
import signal
import subprocess
import time

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


def _live_processes():
    """{pid: (ppid, pgid)} of every process that is not a zombie."""
    out = {}
    # not Path.glob: it stats each entry, and one that ends meanwhile fails it
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                # after the command's closing parenthesis: state ppid pgrp ...
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out[int(pid)] = (int(fields[1]), int(fields[2]))
    return out


def group_alive(pgid):
    """Some member of process group pgid runs (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg; look for live members
    return any(g == pgid for _, g in _live_processes().values())


def family(leader):
    """Live pids of what spawn() started as `leader`: its process group and
    every descendant of the leader, in that group or not (a child that
    left the group, or whose parent died, is still found by either)."""
    procs = _live_processes()
    found = {pid for pid, (_, g) in procs.items() if g == leader}
    found |= {leader} if leader in procs else set()
    while True:
        more = {pid for pid, (pp, _) in procs.items() if pp in found} - found
        if not more:
            return found
        found |= more


def kill_family(proc, grace=10.0):
    """SIGKILL to every process of family(proc.pid) at once (the group with
    one killpg, then each one found outside it), again until none is left;
    the leader is reaped. Returns the pids killed. A process still there
    after `grace` seconds fails."""
    killed = set()
    deadline = time.monotonic() + grace
    while True:
        pids = family(proc.pid)
        if not pids:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {sorted(pids)} survive SIGKILL")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        proc.poll()
        time.sleep(0.01)
    proc.wait(timeout=5)
    return killed


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
