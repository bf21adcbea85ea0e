"""Waits with a deadline or on progress, and loopback ports."""

import random
import socket
import time

DEFAULT_TIMEOUT = 5.0


def wait_until(cond, timeout=DEFAULT_TIMEOUT, what="condition", interval=0.005):
    """Poll cond() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_while_moving(cond, progress, what, quiet=5.0, interval=0.05):
    """Poll cond() until it returns something truthy, for as long as
    progress() keeps changing; fail once it has stood still for `quiet`
    seconds. For receivers that drain a backlog whose size the load
    decides: a fixed deadline would fail a slow machine, while a count
    that stops moving short of its target is a loss on any machine."""
    last, still_since = progress(), time.monotonic()
    while True:
        value = cond()
        if value:
            return value
        now = progress()
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            raise AssertionError(f"no progress for {quiet}s (at {now}) waiting for {what}")
        time.sleep(interval)


def free_port(kind=socket.SOCK_DGRAM):
    """A loopback port free now (UDP by default, SOCK_STREAM for TCP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lasting_port(kind=socket.SOCK_STREAM):
    """A loopback port free now and outside the kernel's ephemeral range, so
    that no outgoing connection or bind(0) can take it: for a listener that
    stops and must get the same port back when it starts again."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"harness: no free loopback port in 10000-{low}")


def closed_tcp_port():
    """A loopback TCP port nobody listens on: a connect is refused at once."""
    return free_port(socket.SOCK_STREAM)
