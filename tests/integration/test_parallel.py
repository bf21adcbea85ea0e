"""PARALLEL: every subscriber gets every event, whatever the others do."""

import pytest

from evvharness import assert_quiet, raise_one, virtual


def test_every_subscriber_gets_every_event(srv, recv):
    subs = recv.udp(3)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", *subs))
    for i in range(5):
        assert raise_one(srv, ev, i, subs, copies=3) == [0, 1, 2]
    assert_quiet(subs, [5, 5, 5], ev)


@pytest.mark.parametrize("dead_at", [0, 1], ids=["dead-first", "dead-middle"])
def test_dead_subscriber_does_not_stop_the_others(srv, recv, dead_at):
    subs = recv.udp(3)
    subs[dead_at] = recv.dead()
    live = [s for i, s in enumerate(subs) if i != dead_at]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", *subs))
    for i in range(5):
        raise_one(srv, ev, i, live, copies=2, timeout=3)
    assert_quiet(live, [5, 5], ev)


def test_one_event_over_udp_unix_and_flatstore(srv, recv):
    udp, unix, flat = recv.udp(), recv.unix(), recv.flatstore()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", udp, unix, flat))
    srv.raise_event(ev, {"seq": 7, "who": "all"})
    for r in (udp, unix):
        r.wait_count(1, ev)
        assert r.events(ev)[0]["params"] == {"seq": 7, "who": "all"}
    flat.wait_count(1, ev)
    assert flat.events(ev)[0]["raw"] == f"{ev},7,all"
    assert_quiet([udp, unix, flat], [1, 1, 1], ev)
