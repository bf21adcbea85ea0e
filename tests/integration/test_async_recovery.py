"""Asynchronous transports (event_stream, reliable mode): a subscriber whose
failure was reported asynchronously is passed over for failover_timeout
(1 s here), then takes events again once it answers success."""

import time

import pytest

from evvharness import raise_one, seqs_of, virtual, wait_until

pytestmark = pytest.mark.server(failover_timeout=1, stream_timeout=300)


@pytest.mark.parametrize("policy", ["FAILOVER", "ROUND-ROBIN"])
def test_failed_async_subscriber_comes_back_after_failover_timeout(srv, recv, policy):
    server, udp = recv.tcp("error"), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual(policy, server, udp))
    live = [server, udp]

    # event 0 starts at the server (first subscriber, first in rotation),
    # is answered with an error and continues to udp
    t_raise = time.monotonic()   # the failure comes after this
    raise_one(srv, ev, 0, [udp], timeout=5)
    assert seqs_of(server, ev) == [0], "the server was not tried first"
    failed_at = time.monotonic()
    [entry] = srv.virtual_list(ev)
    state = entry["Subscribers"][0]
    assert state["state"] == "skipped" and state["failures"] == 1, (
        f"asynchronous failure not recorded: {state}")
    assert 0 < state["skipped_for_ms"] <= 1000, state

    # inside the window the server is passed over; the test means it only
    # if it was quick enough (as test_failover.py)
    raise_one(srv, ev, 1, [udp], timeout=5)
    elapsed = time.monotonic() - t_raise
    assert elapsed < 0.8 * srv.failover_timeout, (
        f"harness too slow: event 1 raised {elapsed:.2f}s after event 0's failure, "
        f"failover_timeout {srv.failover_timeout}s")
    assert seqs_of(server, ev) == [0], (
        f"the failed subscriber was tried inside its failover window: {seqs_of(server, ev)}")

    # the server answers success from now on; once its window is over,
    # events go to it again
    server.set_mode("ok")
    seq = 2

    def next_reaches_server():
        nonlocal seq
        got = raise_one(srv, ev, seq, live, timeout=5)
        seq += 1
        return got == [0]

    wait_until(next_reaches_server, 5, "an event to reach the recovered server")
    assert time.monotonic() - failed_at > 0.5, "window much shorter than failover_timeout"
    # the server got the event before event_stream read its answer: its
    # health changes when that asynchronous report arrives
    wait_until(lambda: srv.virtual_list(ev)[0]["Subscribers"][0]["state"] == "healthy", 5,
               "the server's success report to mark it healthy")
    # and it keeps its place: FAILOVER sends it everything, ROUND-ROBIN
    # alternates again
    want = [[0], [0]] if policy == "FAILOVER" else [[1], [0]]
    for w in want:
        got = raise_one(srv, ev, seq, live, timeout=5)
        assert got == w, f"{policy}: event {seq} went to {got}, expected {w}"
        seq += 1
    later = [s for r in live for s in seqs_of(r, ev) if s >= 2]
    assert sorted(later) == list(range(2, seq)), (
        f"events 2..{seq - 1} lost or duplicated: server {seqs_of(server, ev)}, "
        f"udp {seqs_of(udp, ev)}")
    assert seqs_of(udp, ev)[:2] == [0, 1] and seqs_of(server, ev)[0] == 0, (
        seqs_of(udp, ev), seqs_of(server, ev))
