"""Asynchronous transports, event_stream in reliable mode: every JSON-RPC
request is answered later, from event_stream's sender process, and the
answer is the outcome (an error answer, no answer within the timeout or a
refused connection being failures).

Default failover_timeout (30 s): a subscriber that failed stays passed over
for the rest of a test."""

import pytest

from evvharness import (assert_each_once, assert_quiet, closed_tcp_port, raise_one,
                        seqs_of, stats_delta, virtual, wait_until)

pytestmark = pytest.mark.server(stream_timeout=300)

# the failures: a JSON-RPC error answer, no answer (event_stream's timeout,
# checked by its sender about once a second), a closed port
FAILURES = ["error", "silent", "refused"]


def failing_subscriber(kind, recv):
    """(socket string, receiver or None) failing the given way."""
    if kind == "refused":
        return f"tcp:127.0.0.1:{closed_tcp_port()}", None
    r = recv.tcp("error" if kind == "error" else "hold")
    return r.socket, r


# an event waits up to timeout + ~1 s per silent subscriber
RAISE_TIMEOUT = 5


@pytest.mark.parametrize("kind", FAILURES)
def test_failover_moves_on_after_each_kind_of_failure(srv, recv, kind):
    """FAILOVER [failing, live stream, backup UDP]: the live server gets
    every event once, the backup none, the failing one each at most once."""
    bad_sock, bad = failing_subscriber(kind, recv)
    live, backup = recv.tcp("ok"), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", bad_sock, live, backup))
    n = 6
    for i in range(n):
        got = raise_one(srv, ev, i, [live, backup], timeout=RAISE_TIMEOUT)
        assert got == [0], f"event {i} went to {got} (0 = live server, 1 = backup)"
    assert_quiet([live, backup], [n, 0], ev)
    assert_each_once([live, backup], ev, list(range(n)), attempts=[bad] if bad else [])
    if bad is not None:
        assert bad.count(ev) >= 1, "the failing subscriber was never tried"


def test_failover_one_event_through_every_kind_of_failure(srv, recv):
    """FAILOVER [refused, error, silent, live, backup]: the first event fails
    three ways in a row, each failure reported later, then is delivered;
    event_virtual_list and the statistics show it."""
    refused = f"tcp:127.0.0.1:{closed_tcp_port()}"
    erroring, silent = recv.tcp("error"), recv.tcp("hold")
    live, backup = recv.tcp("ok"), recv.udp()
    ev = srv.new_event()
    sock = virtual("FAILOVER", refused, erroring, silent, live, backup)
    srv.subscribe(ev, sock)
    before = srv.virtual_stats()
    n = 5
    for i in range(n):
        got = raise_one(srv, ev, i, [live, backup], timeout=RAISE_TIMEOUT)
        assert got == [0], f"event {i} went to {got} (0 = live server, 1 = backup)"
    assert_quiet([live, backup], [n, 0], ev)
    assert_each_once([live, backup], ev, list(range(n)), attempts=[erroring, silent])
    # the first event tried both servers; later ones passed them over
    assert seqs_of(erroring, ev) == [0] and seqs_of(silent, ev) == [0], (
        f"failed subscribers retried inside failover_timeout: "
        f"{seqs_of(erroring, ev)} {seqs_of(silent, ev)}")

    [entry] = srv.virtual_list(ev)
    subs = entry["Subscribers"]
    assert [s["socket"] for s in subs] == [refused, erroring.socket, silent.socket,
                                          live.socket, backup.socket], entry
    for s in subs[:3]:
        assert s["state"] in ("skipped", "failing") and s["failures"] == 1 \
            and s["attempts"] == 1, f"failed subscriber shown as {s}"
    assert subs[3]["state"] == "healthy" and subs[3]["attempts"] == n \
        and subs[3]["failures"] == 0, subs[3]
    assert subs[4]["attempts"] == 0, subs[4]

    after = wait_until(
        lambda: (lambda s: s if s["events_delivered"] - before["events_delivered"] >= n else None)(
            srv.virtual_stats()),
        what="event_virtual:events_delivered to count the chains")
    delta = stats_delta(before, after)
    assert delta["events"] == n and delta["events_delivered"] == n \
        and delta["events_failed"] == 0 and delta["failovers"] == 3, (
            f"statistics moved by {delta}, expected events={n} delivered={n} "
            f"failed=0 failovers=3")


def test_failover_every_async_subscriber_fails(srv, recv):
    """All fail: each event is tried on every subscriber once and counted as
    failed (not delivered); then a recovered one takes the next event."""
    a, b = recv.tcp("error"), recv.tcp("error")
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", a, b))
    before = srv.virtual_stats()
    n = 3
    for i in range(n):
        srv.raise_event(ev, {"seq": i})
        wait_until(lambda: i in seqs_of(a, ev) and i in seqs_of(b, ev), RAISE_TIMEOUT,
                   f"event {i} tried on both subscribers")
    after = wait_until(
        lambda: (lambda s: s if s["events_failed"] - before["events_failed"] >= n else None)(
            srv.virtual_stats()),
        what="event_virtual:events_failed")
    assert after["events_delivered"] == before["events_delivered"], (before, after)
    assert sorted(seqs_of(a, ev)) == list(range(n)) and sorted(seqs_of(b, ev)) == list(range(n))


def test_round_robin_around_a_refusing_stream_server_loses_nothing(srv, recv):
    """ROUND-ROBIN [stream server that refuses, live UDP, live stream]:
    every event reaches exactly one live receiver, once; the two share."""
    refused = f"tcp:127.0.0.1:{closed_tcp_port()}"
    udp, live = recv.udp(), recv.tcp("ok")
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", refused, udp, live))
    n = 12
    for i in range(n):
        got = raise_one(srv, ev, i, [udp, live], timeout=RAISE_TIMEOUT)
        assert len(got) == 1, f"event {i} delivered to {got}"
    counts = assert_each_once([udp, live], ev, list(range(n)))
    assert_quiet([udp, live], counts, ev)
    assert abs(counts[0] - counts[1]) <= 1, (
        f"live subscribers do not share evenly while one is passed over: {counts}")
    [entry] = srv.virtual_list(ev)
    dead = entry["Subscribers"][0]
    assert dead["state"] in ("skipped", "failing") and dead["failures"] >= 1, dead


@pytest.mark.parametrize("kind", ["error", "refused"])
def test_round_robin_burst_from_workers_loses_nothing(srv, recv, kind):
    """Bursts raised from the script in both SIP workers, many events in
    flight while the failure reports come back: each event is delivered to
    exactly one live receiver, once.

    The live receivers are UDP here: event_stream itself cannot take many
    answers arriving in one read from a live JSON-RPC server (after 5 it
    logs "too many reads retries", drops the connection and reports every
    request pending on it as failed, including ones the server got), so a
    burst to a live stream server is duplicated by event_stream, not by the
    virtual layer."""
    bad_sock, bad = failing_subscriber(kind, recv)
    udp = recv.udp(2)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", bad_sock, *udp))
    per_burst, bursts = 40, 2
    for b in range(bursts):
        srv.send_sip(ev, count=per_burst, tag=f"b{b}")
    total = per_burst * bursts
    wait_until(lambda: udp[0].count(ev) + udp[1].count(ev) >= total, 10,
               f"{total} events at the live receivers (got {udp[0].count(ev)} + {udp[1].count(ev)})")
    keys = lambda r: [(e["params"]["tag"], int(e["params"]["i"])) for e in r.events(ev)]
    where = {}
    for n, r in enumerate(udp):
        for k in keys(r):
            where.setdefault(k, []).append(n)
    want = [(f"b{b}", i) for b in range(bursts) for i in range(per_burst)]
    lost = [k for k in want if k not in where]
    dup = {f"{k[0]}/{k[1]}": w for k, w in sorted(where.items()) if len(w) > 1}
    assert not lost and not dup and len(where) == total, (
        f"live receivers got {[r.count(ev) for r in udp]} of {total} events: "
        f"lost {lost}, delivered more than once {dup}; log {srv.log.path}")
    assert_quiet(udp, [r.count(ev) for r in udp], ev)
    if bad is not None:
        tried = keys(bad)
        assert len(tried) == len(set(tried)), "an event was tried twice on the failing subscriber"
