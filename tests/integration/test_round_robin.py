"""ROUND-ROBIN: order, rotation shared by processes, dead subscribers, weighting."""

from collections import Counter

import pytest

from evvharness import assert_quiet, raise_one, virtual, wait_until

# default failover_timeout (30 s): a dead subscriber stays passed over
# for the whole test, so the even-share check is exact


def test_order_starts_at_first_and_cycles(srv, recv):
    subs = recv.udp(3)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", *subs))
    for i in range(9):
        got = raise_one(srv, ev, i, subs)
        assert got == [i % 3], f"event {i} went to subscriber(s) {got}, expected [{i % 3}]"
    assert_quiet(subs, [3, 3, 3], ev)


def test_rotation_is_shared_by_worker_processes(srv, recv):
    """Bursts raised from the script in both SIP workers at once.

    3 bursts of 100 (100 = 1 mod 3): however the bursts split between two
    processes, a per-process rotation would leave the counts 2 apart; only a
    rotation shared by all processes gives exactly 100 each (within one)."""
    subs = recv.udp(3)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", *subs))
    per_burst, bursts = 100, 3
    for rnd in range(5):  # until the bursts really ran in two processes
        # a tag per burst: each event known by (tag, i)
        tags = [f"r{rnd}.{b}" for b in range(bursts)]
        for tag in tags:
            srv.send_sip(ev, count=per_burst, tag=tag)
        this_round = lambda: [e for r in subs for e in r.events(ev) if e["params"]["tag"] in tags]
        wait_until(lambda: len(this_round()) >= per_burst * bursts, 15,
                   f"{per_burst * bursts} events of round {rnd}")
        pids = {e["params"]["pid"] for e in this_round()}
        if len(pids) >= 2:
            break
    else:
        pytest.fail("harness: every burst was raised in a single worker process")

    counts = [sum(1 for e in r.events(ev) if e["params"]["tag"] in tags) for r in subs]
    assert_quiet(subs, [r.count(ev) for r in subs], ev)
    got = Counter((e["params"]["tag"], int(e["params"]["i"])) for e in this_round())
    want = Counter((tag, i) for tag in tags for i in range(per_burst))
    assert got == want, (f"lost {sorted((want - got).elements())[:10]}, "
                         f"duplicated {sorted((got - want).elements())[:10]}")
    assert sum(counts) == per_burst * bursts, f"duplicated events: {counts}"
    assert max(counts) - min(counts) <= 1, (
        f"rotation not shared by processes {sorted(pids)}: per-subscriber counts {counts}")


@pytest.mark.parametrize("dead_at", [0, 1, 2])
def test_dead_subscriber_loses_nothing_and_live_ones_share_evenly(srv, recv, dead_at):
    subs = recv.udp(3)
    subs[dead_at] = recv.dead()
    live = [i for i in range(3) if i != dead_at]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", *subs))
    for i in range(30):
        got = raise_one(srv, ev, i, subs, timeout=3)
        assert len(got) == 1 and got[0] in live, f"event {i} delivered to {got}"
    counts = [subs[i].count(ev) for i in live]
    assert sum(counts) == 30
    assert abs(counts[0] - counts[1]) <= 1, (
        f"live subscribers do not share evenly around the dead one: {counts}")


def test_subscriber_listed_twice_gets_two_turns_per_cycle(srv, recv):
    a, b = recv.udp(2)
    ev = srv.new_event()
    sock = virtual("ROUND-ROBIN", a, a, b)
    srv.subscribe(ev, sock)
    assert srv.subscribers(ev) == [sock]
    order = [raise_one(srv, ev, i, [a, b]) for i in range(6)]
    assert order == [[0], [0], [1], [0], [0], [1]]
