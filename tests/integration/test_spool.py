"""The spool (issue 10): events every subscriber failed are held, in order
and within bounds, and replayed by the module's process when a subscriber
comes back.

Unix datagram receivers have short queues (net.unix.max_dgram_qlen, often
10) and event_datagram sends without blocking: a replay burst can fail with
EAGAIN. Such an event just stays held and is retried after
spool_retry_interval, so these servers run with failover_timeout 0 and a
short retry interval, and the tests assert eventual, complete, in-order
delivery without duplicates."""

import time

import pytest

from evvharness import MIError, assert_quiet, raise_one, virtual, wait_until


def spool_stats(srv):
    st = srv.statistics("event_virtual")
    return {k: st[k] for k in ("events_spooled", "events_replayed", "events_dropped")}


def raise_seqs(srv, ev, seqs, tag="a"):
    """Raise ev len(seqs) times from the script of one worker (so in one
    order: MI raise_event hands each raise to some worker, and two workers
    raise in no order between them); seqs must be range(k, k + n) of one
    tag's numbering, continued across calls."""
    seqs = list(seqs)
    offsets = srv.__dict__.setdefault("_spool_offsets", {})   # this server's
    start = offsets.setdefault((ev, tag), 0)
    assert seqs == list(range(start, start + len(seqs))), "seqs continue the last call's"
    offsets[(ev, tag)] = start + len(seqs)
    srv.send_sip(ev, count=len(seqs), tag=f"{tag}{start}")


def seqs_of(receiver, event):
    """The events' numbers: the script's loop index i plus where the raise's
    numbering started (in its tag)."""
    out = []
    for e in receiver.events(event):
        p = e["params"]
        out.append(int(p["tag"][1:]) + int(p["i"]))
    return out


def warm_up(srv, ev):
    """Raise ev once with nothing subscribed, over MI: done when it answers
    (480, no subscriber), unlike a SIP request, which could still be in
    flight when the test subscribes."""
    with pytest.raises(MIError):
        srv.raise_event(ev, {"seq": -1})


def held(srv, ev, sub=None):
    """The Spool object of ev's (only) subscription, or of its subscriber sub."""
    [s] = srv.virtual_list(ev)
    return (s if sub is None else s["Subscribers"][sub])["Spool"]


def test_failover_holds_every_event_and_replays_them_in_order(spool_srv, recv):
    srv = spool_srv()
    s1, s2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER SPOOL(500)", s1, s2))
    assert srv.subscribers(ev) == [virtual("FAILOVER SPOOL(500)", s1, s2)]
    mark = srv.log.mark()
    raise_seqs(srv, ev, range(200))
    wait_until(lambda: held(srv, ev)["spooled"] == 200, 10, "200 events held")
    st = spool_stats(srv)
    assert st["events_spooled"] == 200 and st["events_dropped"] == 0, st
    full = srv.statistics("event_virtual")
    assert full["events_failed"] == 0
    assert full["spool_held"] == 200 and full["spool_memory"] == held(srv, ev)["bytes"] > 0, full
    warnings = [l for l in srv.log.lines_since(mark) if "holding events" in l]
    assert len(warnings) == 1, warnings

    s2.bind()
    raise_seqs(srv, ev, range(200, 220))     # raised during the replay: after the held ones
    s2.wait_count(220, ev, timeout=30)
    time.sleep(0.3)
    assert seqs_of(s2, ev) == list(range(220)), f"out of order, lost or duplicated: {seqs_of(s2, ev)}"
    assert s1.count(ev) == 0
    wait_until(lambda: held(srv, ev)["held"] == 0, 5, "the queue to empty")
    st = spool_stats(srv)
    view = held(srv, ev)
    assert st["events_spooled"] == view["spooled"]
    assert st["events_replayed"] == view["replayed"]
    assert st["events_spooled"] == st["events_replayed"] + st["events_dropped"], st
    assert st["events_dropped"] == 0
    full = srv.statistics("event_virtual")
    assert full["spool_held"] == 0 and full["spool_memory"] == 0, full
    wait_until(lambda: any("its queue is empty" in l for l in srv.log.lines_since(mark)), 5,
               "the NOTICE that the queue drained")


def test_round_robin_all_down_then_two_back(spool_srv, recv):
    srv = spool_srv()
    subs = [recv.dead(), recv.dead(), recv.dead()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN SPOOL(100)", *subs))
    raise_seqs(srv, ev, range(60))
    wait_until(lambda: held(srv, ev)["held"] == 60, 10, "60 events held")
    subs[0].bind()
    subs[2].bind()
    wait_until(lambda: subs[0].count(ev) + subs[2].count(ev) >= 60, 30, "60 replayed")
    time.sleep(0.3)
    got = seqs_of(subs[0], ev) + seqs_of(subs[2], ev)
    assert sorted(got) == list(range(60)), "lost or duplicated"
    for r in (subs[0], subs[2]):
        assert seqs_of(r, ev) == sorted(seqs_of(r, ev)), f"{r} out of order"
    assert subs[1].count(ev) == 0


def test_round_robin_all_down_then_one_back_gets_them_all_in_order(spool_srv, recv):
    srv = spool_srv()
    subs = [recv.dead(), recv.dead(), recv.dead()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN SPOOL(100)", *subs))
    raise_seqs(srv, ev, range(30))
    wait_until(lambda: held(srv, ev)["held"] == 30, 10, "30 events held")
    subs[1].bind()
    raise_seqs(srv, ev, range(30, 35))      # behind the held ones
    subs[1].wait_count(35, ev, timeout=30)
    time.sleep(0.3)
    assert seqs_of(subs[1], ev) == list(range(35))
    assert subs[0].count(ev) == subs[2].count(ev) == 0


def test_hash_holds_and_replays_through_its_placement(spool_srv, recv):
    """HASH(tag): one queue; a replayed event is placed by its own held
    parameter (not counted unkeyed)."""
    srv = spool_srv()
    subs = [recv.dead(), recv.dead()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("HASH(tag) SPOOL(100)", *subs))
    assert srv.subscribers(ev) == [virtual("HASH(tag) SPOOL(100)", *subs)]
    unkeyed = srv.statistics("event_virtual")["events_unkeyed"]
    raise_seqs(srv, ev, range(20))
    wait_until(lambda: held(srv, ev)["held"] == 20, 10, "20 events held")
    for s in subs:
        s.bind()
    wait_until(lambda: sum(s.count(ev) for s in subs) >= 20, 30, "20 replayed")
    time.sleep(0.3)
    got = seqs_of(subs[0], ev) + seqs_of(subs[1], ev)
    assert sorted(got) == list(range(20)), "lost or duplicated"
    for s in subs:
        assert seqs_of(s, ev) == sorted(seqs_of(s, ev)), f"{s} out of order"
    assert srv.statistics("event_virtual")["events_unkeyed"] == unkeyed


def test_parallel_subscriber_down_gets_every_event_it_missed(spool_srv, recv):
    srv = spool_srv()
    a, b, c = recv.unix(), recv.unix(), recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL SPOOL(200)", a, b, c))
    raise_seqs(srv, ev, range(100))
    a.wait_count(100, ev)
    b.wait_count(100, ev)
    wait_until(lambda: held(srv, ev, 2)["held"] == 100, 10, "100 events held for c")
    assert held(srv, ev, 0)["held"] == 0 and held(srv, ev, 1)["held"] == 0
    c.bind()
    c.wait_count(100, ev, timeout=30)
    raise_seqs(srv, ev, range(100, 105))
    for r in (a, b, c):
        r.wait_count(105, ev)
    time.sleep(0.3)
    for r in (a, b, c):
        assert seqs_of(r, ev) == list(range(105)), f"{r}: out of order, lost or duplicated"


def test_overflow_keeps_the_newest_and_counts_the_rest(spool_srv, recv):
    srv = spool_srv()
    n = 20
    s1, s2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    before = spool_stats(srv)
    srv.subscribe(ev, virtual(f"FAILOVER SPOOL({n})", s1, s2))
    mark = srv.log.mark()
    raise_seqs(srv, ev, range(3 * n))
    wait_until(lambda: held(srv, ev)["spooled"] == 3 * n, 10, "every event offered")
    view = held(srv, ev)
    assert view["held"] == n and view["dropped"] == 2 * n, view
    assert view["dropped_overflow"] == 2 * n, view
    s2.bind()
    s2.wait_count(n, ev, timeout=30)
    time.sleep(0.3)
    assert seqs_of(s2, ev) == list(range(2 * n, 3 * n))
    after = spool_stats(srv)
    assert after["events_dropped"] - before["events_dropped"] == 2 * n
    assert after["events_replayed"] - before["events_replayed"] == n
    # one drop line for the episode, with its count (logged after 5 s quiet)
    wait_until(lambda: [l for l in srv.log.lines_since(mark) if "dropped 40 held events" in l],
               15, "the drop episode's WARNING")
    lines = [l for l in srv.log.lines_since(mark) if "held events (" in l and "dropped" in l]
    assert len(lines) == 1, lines


def test_unsubscribe_with_a_full_queue_frees_it(spool_srv, recv):
    srv = spool_srv()
    s1, s2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(100)", s1, s2)
    warm_up(srv, ev)
    base = srv.shm_used()
    before = spool_stats(srv)
    srv.subscribe(ev, sock)
    raise_seqs(srv, ev, range(50))
    wait_until(lambda: held(srv, ev)["held"] == 50, 10, "50 events held")
    assert srv.shm_used() > base + 50 * 40
    srv.unsubscribe(ev, virtual("FAILOVER", s1, s2))   # the option is not identity
    # the core removes a subscription once its expire (0) has passed
    wait_until(lambda: srv.subscribers(ev) == [], 5, "the subscription to go")
    after = spool_stats(srv)
    assert after["events_dropped"] - before["events_dropped"] == 50
    wait_until(lambda: srv.shm_used() <= base + 256, 5,
               f"shm back to {base} (now {srv.shm_used()})")
    s2.bind()
    time.sleep(1)
    assert s2.count(ev) == 0


def test_list_shows_the_queue_and_retry_delivers_now(spool_srv, recv):
    srv = spool_srv(failover_timeout=30)   # no replay on its own for 30 s
    s1, s2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100,600)", s1, s2))
    raise_seqs(srv, ev, range(5))
    wait_until(lambda: held(srv, ev)["held"] == 5, 10, "5 events held")
    time.sleep(0.2)
    [sub] = srv.virtual_list(ev)
    assert sub["spool_size"] == 100 and sub["spool_max_age"] == 600
    view = sub["Spool"]
    assert view["oldest_age_ms"] >= 200 and view["bytes"] > 0 and view["dropped"] == 0, view
    assert 0 < view["retry_in_ms"] <= 30000, view
    # every subscriber still down: the forced attempt fails, all stay held
    mark = srv.log.mark()
    assert srv.mi("event_virtual_retry", {"event": ev}) == {"queues": 1}
    wait_until(lambda: len(srv.log.errors_since(mark, "Cannot raise datagram event")) >= 2, 5,
               "the forced attempt on both subscribers")
    time.sleep(0.3)
    assert held(srv, ev)["held"] == 5
    s2.bind()
    time.sleep(1)
    assert s2.count(ev) == 0, "replayed inside the failover window"
    # the head, now: s2 takes it, which ends its window, so the rest follow
    assert srv.mi("event_virtual_retry", {"event": ev, "mode": "one"}) == {"queues": 1}
    s2.wait_count(5, ev)
    time.sleep(0.3)
    assert seqs_of(s2, ev) == list(range(5))
    wait_until(lambda: held(srv, ev)["held"] == 0, 5, "the queue to empty")
    assert srv.mi("event_virtual_retry", {"event": ev}) == {"queues": 0}
    with pytest.raises(MIError) as err:
        srv.mi("event_virtual_retry", {"event": "E_NO_SUCH"})
    assert err.value.code == 404 and "E_NO_SUCH" in err.value.message, err.value.error
    with pytest.raises(MIError) as err:
        srv.mi("event_virtual_retry", {"mode": "some"})
    assert err.value.code == 400 and "some" in err.value.message, err.value.error


def test_spool_size_modparam_holds_for_plain_sockets(spool_srv, recv):
    srv = spool_srv(spool_size=30)
    s1 = recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", s1))
    raise_seqs(srv, ev, range(10))
    wait_until(lambda: held(srv, ev)["held"] == 10, 10, "10 events held")
    s1.bind()
    s1.wait_count(10, ev, timeout=30)
    time.sleep(0.3)
    assert seqs_of(s1, ev) == list(range(10))
    # SPOOL(0) turns it off for one subscription: an event is lost as before
    ev2 = srv.new_event()
    s2 = recv.dead()
    srv.subscribe(ev2, virtual("FAILOVER SPOOL(0)", s2))
    [sub] = srv.virtual_list(ev2)
    assert "Spool" not in sub
    before = srv.statistics("event_virtual")["events_failed"]
    srv.raise_event(ev2, {"seq": 0})
    wait_until(lambda: srv.statistics("event_virtual")["events_failed"] == before + 1, 5,
               "the event counted failed")


MALFORMED_OPTIONS = [
    # (id, policy and option, the token the ERROR line names, why)
    ("bad-size", "FAILOVER SPOOL(x)", "SPOOL(x)", "the size must be a number"),
    ("size-too-big", "FAILOVER SPOOL(1000001)", "SPOOL(1000001)", "the size must be a number"),
    ("bad-age", "FAILOVER SPOOL(5,x)", "SPOOL(5,x)", "the maximum age must be"),
    ("twice", "FAILOVER SPOOL(1) SPOOL(2)", "SPOOL(2)", "given twice"),
    ("unknown", "ROUND-ROBIN spool(5)", "spool(5)", "unknown option"),
    ("policy-not-first", "FAILOVER HASH(callid)", "HASH(callid)", "is a policy"),
]


@pytest.mark.parametrize("bad,token,why", [c[1:] for c in MALFORMED_OPTIONS],
                         ids=[c[0] for c in MALFORMED_OPTIONS])
def test_malformed_option_is_refused(spool_srv, recv, bad, token, why):
    """As test_malformed.py: an MI error 400, one event_virtual ERROR line
    naming the token (quoted) and why, the server alive, nothing listed,
    no shared memory kept."""
    srv = spool_srv()
    s1 = recv.udp()
    ev = srv.new_event()
    sock = virtual(bad, s1)

    def refused():
        with pytest.raises(MIError) as err:
            srv.subscribe(ev, sock)
        assert err.value.code == 400, err.value.error

    refused()  # warm-up: first-time allocations do not count as leaks
    baseline = srv.shm_used()
    mark = srv.log.mark()
    refused()

    def naming():
        return [line for line in srv.log.errors_since(mark, module="event_virtual")
                if f"'{token}'" in line and why in line]
    wait_until(naming, 2, f"an event_virtual ERROR line naming '{token}': {why}")
    assert len(naming()) == 1, naming()
    assert len(srv.log.errors_since(mark, module="event_virtual")) == 1, srv.log.tail(5)
    srv.assert_alive()
    assert srv.subscribers(ev) == []
    assert srv.shm_used() == baseline, "shared memory not released on refusal"


def test_without_a_spool_nothing_changes(spool_srv, recv):
    srv = spool_srv()
    s1, s2 = recv.dead(), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", s1, s2))
    [sub] = srv.virtual_list(ev)
    assert "Spool" not in sub and "spool_size" not in sub
    assert raise_one(srv, ev, 0, [s1, s2]) == [1]
    assert spool_stats(srv) == {"events_spooled": 0, "events_replayed": 0,
                                "events_dropped": 0}


def numbers(requests):
    """The events' numbers of JSON-RPC requests (as seqs_of)."""
    return [int(r["params"]["tag"][1:]) + int(r["params"]["i"]) for r in requests]


def answered_after(server, ev, start):
    """Numbers of the requests server got from index start on."""
    out = []
    for e in server.events(ev)[start:]:
        p = e["params"]
        out.append(int(p["tag"][1:]) + int(p["i"]))
    return out


def test_failover_asynchronous_chain_is_held_and_replayed_once(spool_srv, recv):
    """event_stream reliable mode: every chain ends in failure (both answer
    errors) and holds its event; once one answers OK, each held event is
    replayed through the policy, one in flight at a time, and taken once."""
    srv = spool_srv()
    t1, t2 = recv.tcp("error"), recv.tcp("error")
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100)", t1, t2))
    before = spool_stats(srv)
    raise_seqs(srv, ev, range(20))
    wait_until(lambda: held(srv, ev)["spooled"] >= 20, 15, "20 events held")
    mark = t2.count(ev)
    t2.set_mode("ok")
    wait_until(lambda: held(srv, ev)["held"] == 0, 30, "the queue to drain")
    time.sleep(0.5)
    got = answered_after(t2, ev, mark)
    # an attempt answered with an error just before the switch may show
    # twice among the requests; every event is answered OK exactly once
    ok = numbers(t2.answered(ev, "ok"))
    assert sorted(ok) == list(range(20)), f"answered OK: {ok}; requests since the switch {got}"
    assert t1.answered(ev, "ok") == [], numbers(t1.answered(ev, "ok"))
    after = spool_stats(srv)
    assert after["events_replayed"] - before["events_replayed"] == 20, after
    assert after["events_dropped"] == before["events_dropped"]
    view = held(srv, ev)
    assert view["spooled"] == view["replayed"] == 20, view


def test_parallel_asynchronous_subscriber_gets_what_it_failed(spool_srv, recv):
    srv = spool_srv()
    a, c = recv.unix(), recv.tcp("error")
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL SPOOL(100)", a, c))
    raise_seqs(srv, ev, range(30))
    a.wait_count(30, ev)
    wait_until(lambda: held(srv, ev, 1)["spooled"] >= 30, 15, "30 events held for c")
    mark = c.count(ev)
    c.set_mode("ok")
    wait_until(lambda: held(srv, ev, 1)["held"] == 0, 30, "c's queue to drain")
    time.sleep(0.5)
    ok = numbers(c.answered(ev, "ok"))
    assert sorted(ok) == list(range(30)), (
        f"answered OK: {ok}; requests since the switch {answered_after(c, ev, mark)}")
    assert held(srv, ev, 1)["replayed"] == 30
    assert seqs_of(a, ev) == list(range(30))


def test_events_older_than_max_age_are_dropped_not_replayed(spool_srv, recv):
    srv = spool_srv()
    s1 = recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100,1)", s1))
    before = spool_stats(srv)
    raise_seqs(srv, ev, range(10))
    wait_until(lambda: held(srv, ev)["spooled"] == 10, 10, "10 events held")
    wait_until(lambda: held(srv, ev).get("dropped_age") == 10, 10, "the 10 events aged out")
    s1.bind()
    time.sleep(1)
    assert s1.count(ev) == 0
    view = held(srv, ev)
    assert view["held"] == 0 and view["replayed"] == 0, view
    after = spool_stats(srv)
    assert after["events_dropped"] - before["events_dropped"] == 10
    # an event raised now goes live
    raise_seqs(srv, ev, range(10, 11))
    s1.wait_count(1, ev)
    assert seqs_of(s1, ev) == [10]


def test_memory_budget_bounds_every_spool_together(spool_srv, recv):
    budget = 64 * 1024
    srv = spool_srv(spool_max_memory="64K")
    evs, socks = [], []
    for _ in range(4):
        s = recv.dead()
        ev = srv.new_event()
        srv.subscribe(ev, virtual("FAILOVER SPOOL(1000)", s))
        evs.append(ev)
        socks.append(s)
    peak = 0
    for round_ in range(5):
        for ev in evs:
            # the tag numbers the events (as raise_seqs does), 2000 bytes
            # long; one request per event at a time, so that they enter
            # its queue in their numbers' order
            srv.send_sip(ev, count=20, tag=f"a{20 * round_}-".ljust(2000, "x"))
        for ev in evs:
            wait_until(lambda: held(srv, ev)["spooled"] == 20 * (round_ + 1), 10,
                       f"round {round_} of {ev} offered")
        peak = max(peak, srv.statistics("event_virtual")["spool_memory"])
    wait_until(lambda: sum(held(srv, ev)["spooled"] for ev in evs) == 400, 15,
               "every event offered")
    st = srv.statistics("event_virtual")
    peak = max(peak, st["spool_memory"])
    assert 0 < peak <= budget, (peak, st)
    views = [held(srv, ev) for ev in evs]
    assert sum(v.get("dropped_budget", 0) for v in views) > 0, views
    for v in views:
        assert v["spooled"] == v["held"] + v["dropped"] + v["replayed"], v
    assert st["spool_held"] == sum(v["held"] for v in views)
    assert st["spool_memory"] == sum(v["bytes"] for v in views)
    srv.assert_alive("with the budget spent")
    # the receivers come back: what was held arrives, in order per queue,
    # each once, and nothing else
    for s in socks:
        s.bind()
    for ev, s, v in zip(evs, socks, views):
        s.wait_count(v["held"], ev, timeout=30)
    wait_until(lambda: srv.statistics("event_virtual")["spool_memory"] == 0, 10,
               "the budget given back")
    assert_quiet(socks, [v["held"] for v in views], window=0.5)
    for ev, s, v in zip(evs, socks, views):
        got = [int(e["params"]["tag"][1:].split("-")[0]) + int(e["params"]["i"])
               for e in s.events(ev)]
        assert len(got) == v["held"] and got == sorted(set(got)), (
            f"{ev}: out of order or twice: {got}")
        assert set(got) <= set(range(100)), got
        assert held(srv, ev)["replayed"] == v["held"], held(srv, ev)


def test_expiry_with_held_events_drops_them(spool_srv, recv):
    srv = spool_srv()
    s1 = recv.dead()
    ev = srv.new_event()
    warm_up(srv, ev)
    base = srv.shm_used()
    before = spool_stats(srv)
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100)", s1), expire=2)
    raise_seqs(srv, ev, range(20))
    wait_until(lambda: held(srv, ev)["held"] == 20, 10, "20 events held")
    mark = srv.log.mark()
    # the core removes an expired subscription at its next walk of the event
    wait_until(lambda: srv.subscribers(ev) == [], 10, "the subscription to expire")
    after = spool_stats(srv)
    assert after["events_dropped"] - before["events_dropped"] == 20
    assert any("with 20 held events: dropped" in l for l in srv.log.lines_since(mark))
    wait_until(lambda: srv.shm_used() <= base + 256, 5,
               f"shm back to {base} (now {srv.shm_used()})")
    assert srv.statistics("event_virtual")["spool_held"] == 0


def test_unsubscribe_while_a_held_event_is_in_flight(spool_srv, recv):
    srv = spool_srv()
    t = recv.tcp("error")
    ev = srv.new_event()
    before = spool_stats(srv)
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100)", t))
    raise_seqs(srv, ev, range(5))
    wait_until(lambda: held(srv, ev)["spooled"] == 5, 15, "5 events held")
    t.set_mode("hold")
    wait_until(lambda: "in_flight_ms" in held(srv, ev) and t.held(), 10,
               "a replay in flight, unanswered")
    srv.unsubscribe(ev, virtual("FAILOVER", t))
    wait_until(lambda: srv.subscribers(ev) == [], 5, "the subscription to go")
    t.release()                                    # its report comes after the close
    wait_until(lambda: srv.statistics("event_virtual")["spool_held"] == 0, 10,
               "the one in flight settled")
    after = spool_stats(srv)
    dropped = after["events_dropped"] - before["events_dropped"]
    replayed = after["events_replayed"] - before["events_replayed"]
    assert dropped + replayed == 5 and replayed <= 1, (dropped, replayed)
    st = srv.statistics("event_virtual")
    assert st["spool_memory"] == 0, st
    srv.assert_alive("after a late report on a closed queue")


def test_shutdown_says_how_many_held_events_it_drops(spool_srv, recv):
    srv = spool_srv()
    s1 = recv.dead()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER SPOOL(100)", s1))
    raise_seqs(srv, ev, range(7))
    wait_until(lambda: held(srv, ev)["held"] == 7, 10, "7 events held")
    procs = srv.mi("ps")["Processes"]
    assert [p for p in procs if p["Type"] == "event_virtual spool"], procs
    mark = srv.log.mark()
    srv.stop()
    lines = srv.log.lines_since(mark)
    assert any("shutdown: 7 held events dropped" in l for l in lines), lines[-10:]
    assert not [l for l in lines if "CRITICAL" in l or "segfault" in l]
