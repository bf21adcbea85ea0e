"""Asynchronous subscribers: event_stream in reliable mode answers each
event with a JSON-RPC result or error, reported to the raiser later."""

import pytest

from evvharness import assert_quiet, raise_one, virtual

pytestmark = pytest.mark.server(failover_timeout=1)


def test_failover_async_success_stops_the_chain(srv, recv):
    subs = [recv.tcp("ok"), recv.udp()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))
    for i in range(4):
        assert raise_one(srv, ev, i, subs) == [0]
    assert_quiet(subs, [4, 0], ev)


@pytest.mark.parametrize("policy", ["FAILOVER", "ROUND-ROBIN"])
def test_async_failure_moves_on_to_the_next_subscriber(srv, recv, policy):
    """The event answered with an error by the first subscriber continues
    with the next one; no event is lost."""
    refuser, udp = recv.tcp("error"), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual(policy, refuser, udp))
    for i in range(6):
        raise_one(srv, ev, i, [udp], timeout=3)
    assert udp.count(ev) == 6
    assert refuser.count(ev) >= 1, "the asynchronous subscriber was never tried"


def test_parallel_async_failure_does_not_touch_the_others(srv, recv):
    refuser, udp = recv.tcp("error"), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", refuser, udp))
    for i in range(4):
        raise_one(srv, ev, i, [refuser, udp], copies=2)
    assert_quiet([refuser, udp], [4, 4], ev)
