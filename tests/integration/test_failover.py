"""FAILOVER with failover_timeout=1."""

import time

import pytest

from evvharness import assert_quiet, raise_one, virtual, wait_until

pytestmark = pytest.mark.server(failover_timeout=1)

DATAGRAM_FAILURE = "Cannot raise datagram event"  # event_datagram's ERROR line


def test_first_healthy_subscriber_takes_all(srv, recv):
    subs = recv.udp(2)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))
    for i in range(5):
        assert raise_one(srv, ev, i, subs) == [0]
    assert_quiet(subs, [5, 0], ev)


def test_dead_first_subscriber_second_gets_every_event(srv, recv):
    subs = [recv.dead(), recv.udp()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))
    for i in range(5):
        assert raise_one(srv, ev, i, subs, timeout=3) == [1], f"event {i}"
    assert_quiet(subs[1:], [5], ev)


def test_failed_subscriber_skipped_inside_timeout_then_retried(srv, recv):
    s1, s2 = recv.dead(), recv.udp()
    subs = [s1, s2]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))

    t_raise = time.monotonic()
    assert raise_one(srv, ev, 0, subs) == [1]   # s1 fails, s2 takes it
    s1.bind()                                    # s1 healthy again ...
    assert raise_one(srv, ev, 1, subs) == [1], (
        "a subscriber that failed less than failover_timeout ago was not skipped")
    # ... but it is skipped only if we were quick enough for the test to mean it
    assert time.monotonic() - t_raise < 0.8 * srv.failover_timeout, "harness too slow"

    # once the timeout has passed, s1 is tried again and takes the events
    seq = iter(range(2, 1000))
    wait_until(lambda: raise_one(srv, ev, next(seq), subs) == [0], 5,
               "an event to reach the recovered first subscriber", interval=0.1)
    assert raise_one(srv, ev, next(seq), subs) == [0], "success did not clear the failure"


def test_failure_right_after_start_is_remembered(own_srv, recv):
    """The first second of the server's life is no exception (a failure time
    of 0 ticks must not read as 'never failed')."""
    s1, s2 = recv.dead(), recv.udp()
    ev = own_srv.new_event()
    own_srv.subscribe(ev, virtual("FAILOVER", s1, s2))
    assert raise_one(own_srv, ev, 0, [s1, s2]) == [1]
    s1.bind()
    assert raise_one(own_srv, ev, 1, [s1, s2]) == [1], (
        "a failure in the server's first second was forgotten")


def test_all_failed_recently_then_all_are_tried(srv, recv):
    s1, s2 = recv.dead(), recv.dead()
    subs = [s1, s2]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", *subs))

    mark = srv.log.mark()
    srv.raise_event(ev, {"seq": 0})             # both fail
    wait_until(lambda: len(srv.log.errors_since(mark, DATAGRAM_FAILURE)) >= 2, 3,
               "both subscribers to fail event 0")
    s2.bind()                                    # within failover_timeout of its failure
    assert raise_one(srv, ev, 1, subs, timeout=3) == [1], (
        "with every subscriber failed recently, the event must still be tried on all")
