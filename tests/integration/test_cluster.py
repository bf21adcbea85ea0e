"""Two OpenSIPS nodes in one cluster (clusterer, proto_bin) share their
subscribers' health (issue 18): what one node finds failing, the other
skips without trying it, until the first finds it back."""

import time

import pytest

from evvharness import raise_one, virtual, wait_until

A, B = 1, 2  # node ids


def sub(srv, event, i):
    """Subscriber i of the one virtual subscription of `event` on srv."""
    subs = srv.virtual_list(event)
    assert len(subs) == 1, subs
    return subs[0]["Subscribers"][i]


def cluster_stats(srv):
    s = srv.statistics("event_virtual")
    return {k: s[f"cluster_{k}"] for k in ("sent", "received", "dropped")}


def test_a_failure_one_node_finds_is_skipped_by_the_other_until_it_recovers(make_cluster,
                                                                              recv):
    # A's window is short (it retries soon), B's long: B tries the
    # subscriber again within its own window only because A said so
    a, b = make_cluster({"failover_timeout": 1}, {"failover_timeout": 60})
    dead, live = recv.dead(), recv.udp()
    subs = [dead, live]
    ev = a.new_event()
    assert b.new_event() == ev
    sock = virtual("FAILOVER", *subs)
    a.subscribe(ev, sock)
    b.subscribe(ev, sock)

    # A finds the first subscriber failing, and tells B
    assert raise_one(a, ev, 0, subs) == [1]
    wait_until(lambda: sub(b, ev, 0).get("from_node") == A, 5,
               "B to hear from A that its first subscriber fails")
    s = sub(b, ev, 0)
    assert s["state"] == "skipped" and s["attempts"] == 0, s
    assert "from_node" not in sub(a, ev, 0), "A's own finding is not from a peer"

    # back up now, but B does not try it: A said it failed
    dead.bind()
    for seq in (1, 2, 3):
        assert raise_one(b, ev, seq, subs) == [1], f"B tried the subscriber A found failing ({seq})"
    assert sub(b, ev, 0)["attempts"] == 0
    assert sub(b, ev, 1)["attempts"] == 3

    # A tries it again after its own window, finds it back, and tells B
    seq = iter(range(10, 1000))
    wait_until(lambda: raise_one(a, ev, next(seq), subs) == [0], 10,
               "A to find its first subscriber back", interval=0.1)
    wait_until(lambda: sub(b, ev, 0)["state"] == "healthy", 5,
               "B to hear from A that its first subscriber recovered")
    assert sub(b, ev, 0)["from_node"] == A
    # within B's own 60 s window of the failure: healthy only by A's word
    assert raise_one(b, ev, 1000, subs) == [0]
    s = sub(b, ev, 0)
    assert s["attempts"] == 1 and "from_node" not in s, s

    # one packet per transition, none per event
    assert cluster_stats(a)["sent"] == 2
    assert cluster_stats(b) == {"sent": 0, "received": 2, "dropped": 0}
