"""Held events survive a restart and a crash (issue 17): with
`restart_persistency` on, what a spool holds is kept in OpenSIPS's
restart-persistent memory (the file `restart_persistency_cache_file`) and
replayed, first and in order, once the same subscription (event and socket
text without its SPOOL option) exists again.

Each server here has a cache file of its own in the test's tmp folder and
is stopped cleanly (SIGTERM to the main process, as `kill <pid>`) or
crashed (SIGKILL to every one of its processes at once), then started again
with the same configuration.

Events carry a number (`seq`) and are raised in a known order: a burst
from the script of one worker (a SIP request, X-Count n: seq = where the
burst starts + the loop index i), or over MI one at a time, each held
before the next is raised (MI raise_event hands the raise to some worker
and answers at once: its answer says nothing, the subscription's `spooled`
count does).

After a crash, the event a queue was attempting at that moment may have
arrived, so it is dropped at the start and counted (`restore_dropped`); a
record torn by the kill is dropped and counted too. The checks allow that
and nothing more: every event accepted before the kill arrives at most once
and in order, and one that does not is counted."""

import os
import re
import threading
import time

import pytest

from evvharness import OpenSips, assert_quiet, crash_lines, virtual, wait_until
from evvharness.processes import family

RETRY_MS = 50          # spool_retry_interval: a receiver back is tried at once
RPM_MB = 4             # restart_persistency_size
MEMORY = "1M"          # spool_max_memory, and so the persistent region's size
MAGIC = b"EVVSPOOL"    # the region's first 8 bytes; a little-endian u32 layout version follows
DURABLE_STATS = ("events_restored", "restore_waiting", "restore_dropped", "events_unpersisted")
FOUND = re.compile(r"restart persistency: found (\d+) held events of (\d+) subscriptions"
                   r"(?:, dropped (\d+) \((.*)\))?")


def durable_options(rpm, grace=None, memory=MEMORY, rpm_mb=RPM_MB, persist=1, **options):
    """OpenSips keywords of a server with restart persistency (persist=1)
    over the cache file rpm."""
    params = {"spool_retry_interval": RETRY_MS, "spool_max_memory": memory,
              "restart_persistency": persist}
    if grace is not None:
        params["restart_persistency_grace"] = grace
    return dict(failover_timeout=0, virtual_params=params,
                core_params={"restart_persistency_cache_file": str(rpm),
                             "restart_persistency_size": rpm_mb}, **options)


@pytest.fixture
def durable(make_srv, tmp_path):
    """durable(**durable_options) -> a started server over this test's
    cache file (srv.rpm); one per test."""
    made = []

    def make(**kw):
        assert not made, "one server per cache file"
        rpm = tmp_path / "evv.rpm"
        made.append(make_srv(**durable_options(rpm, **kw)))
        made[0].rpm = rpm
        return made[0]
    return make


# ---- raising in order, and what arrived ----------------------------------

def burst(srv, ev, start, n, pad=""):
    """Raise ev n times from the script of one worker, in that order:
    seq start .. start + n - 1 (pad: a longer parameter)."""
    srv.send_sip(ev, count=n, tag=f"s{start}" + (f"-{pad}" if pad else ""))


def seq(e):
    p = e["params"]
    if "seq" in p:
        return int(p["seq"])
    return int(p["tag"][1:].split("-")[0]) + int(p["i"])


def seqs(r, ev):
    return [seq(e) for e in r.events(ev)]


def spooled(srv, ev):
    """Events ev's (only) subscription has held since it was made."""
    [s] = srv.virtual_list(ev)
    return sum(x["Spool"]["spooled"] for x in [s] + s["Subscribers"] if "Spool" in x)


def raise_held(srv, ev, numbers, **params):
    """Raise ev over MI once per number, each held before the next is
    raised (every subscriber, or for PARALLEL one, is down)."""
    for n in numbers:
        before = spooled(srv, ev)
        srv.raise_event(ev, {"seq": n, **params})
        wait_until(lambda: spooled(srv, ev) > before, 10, f"{ev} seq {n} held")


def stats(srv):
    st = srv.statistics("event_virtual")
    missing = [k for k in DURABLE_STATS if k not in st]
    assert not missing, f"statistics missing: {missing}: {st}"
    return st


def wait_stat(srv, name, n):
    wait_until(lambda: stats(srv)[name] == n, 15, f"{name} == {n} (at {stats(srv)[name]})")


def assert_counted(st):
    """The counting rule, at rest."""
    assert st["events_spooled"] + st["events_restored"] == \
        st["events_replayed"] + st["events_dropped"] + st["spool_held"], st


def identity(sock):
    """A subscription's text as the persistent memory knows it: without SPOOL(...)."""
    return re.sub(r" SPOOL\([^)]*\)", "", sock)


def found(srv):
    """(held, subscriptions, dropped) of this start's NOTICE."""
    lines = [l for l in srv.log.lines_since(srv.start_mark) if "restart persistency: found" in l]
    assert len(lines) == 1, f"one 'restart persistency: found' NOTICE expected: {lines}"
    assert "NOTICE" in lines[0], lines[0]
    m = FOUND.search(lines[0])
    assert m, f"not the documented form: {lines[0]}"
    return int(m[1]), int(m[2]), int(m[3] or 0)


def restart_view(srv):
    res = srv.mi("event_virtual_list")
    assert "Restart" in res, f"no Restart object in event_virtual_list: {res}"
    return res["Restart"]


def assert_view(srv, restored, waiting, dropped):
    view = restart_view(srv)
    assert {k: view.get(k) for k in ("restored", "waiting", "dropped")} == \
        {"restored": restored, "waiting": waiting, "dropped": dropped}, view


def waiting_of(srv, ev):
    """The Restart.Waiting entry of event ev (one)."""
    got = [w for w in restart_view(srv)["Waiting"] if w["event"] == ev]
    assert len(got) == 1, restart_view(srv)
    return got[0]


def settled(r, quiet=0.3):
    """Wait until receiver r has read what was sent to it (its count
    stands still for `quiet` seconds): after a kill, nothing more comes."""
    last = -1
    while r.count() != last:
        last = r.count()
        time.sleep(quiet)


def no_crash(srv):
    srv.assert_alive("after its start")
    assert not crash_lines(srv.log.text()), crash_lines(srv.log.text())


def check_replayed(got, held, new, how, dropped, maybe=()):
    """got: the seqs a receiver got, as they arrived, of the `held` ones
    (accepted before the stop, in that order) and the `new` ones (raised
    after the start). Every one at most once, in order, the held ones
    first; after a clean stop all of them; after a kill, one of the held
    ones may be missing if it is counted (`dropped`: restore_dropped).
    `maybe`: raised before a kill, perhaps accepted (they come after the
    held ones). Returns the held ones that are missing."""
    dup = sorted({s for s in got if got.count(s) > 1})
    assert not dup, f"delivered more than once: {dup}; got {got}"
    order = {s: k for k, s in enumerate(list(held) + list(maybe) + list(new))}
    extra = [s for s in got if s not in order]
    assert not extra, f"never raised: {extra}; got {got}"
    assert got == sorted(got, key=order.get), f"out of order: {got}"
    missing_new = [s for s in new if s not in got]
    assert not missing_new, f"raised after the start, not delivered: {missing_new}; got {got}"
    lost = [s for s in held if s not in got]
    if how == "term":
        assert not lost, f"held at a clean stop, not delivered after it: {lost}; got {got}"
    else:
        assert len(lost) <= dropped, (f"held at the kill, neither delivered nor counted: "
                                      f"{lost}, restore_dropped {dropped}; got {got}")
    return lost


def at_rest_kill(how, lost, held, dropped):
    """A kill while every subscriber was down and nothing was raised: the
    only event that can be in doubt is the one a queue's replay was
    attempting, its head; it failed (the subscriber is down), so it is
    missing exactly when it is counted."""
    if how == "kill":
        assert lost in ([], list(held)[:1]), f"lost {lost}: only the head can be in doubt"
        assert dropped == len(lost), f"restore_dropped {dropped}, lost {lost}"
    else:
        assert dropped == 0


# ---- the harness: a crash is every process ------------------------------

def test_kill_all_leaves_no_process_of_the_server(durable):
    srv = durable()
    listed = {p["PID"] for p in srv.mi("ps")["Processes"]}
    assert len(listed) >= 5 and listed <= set(srv.pids()), (listed, srv.pids())
    main = srv.proc.pid
    killed = srv.kill_all()
    assert listed <= killed, f"not killed: {listed - killed}"
    assert not family(main)
    srv.start()
    assert srv.alive()


# ---- a clean stop and a crash, every policy -----------------------------

@pytest.mark.parametrize("how", ["term", "kill"])
def test_failover_held_events_come_back_first_in_order_once(durable, recv, how):
    srv = durable()
    s1, s2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(500)", s1, s2)
    srv.subscribe(ev, sock)
    burst(srv, ev, 0, 100)
    wait_stat(srv, "spool_held", 100)
    mark = srv.log.mark()

    srv.restart(how)
    if how == "term":
        assert any("shutdown: 100 held events kept for the next start" in l
                   for l in srv.log.lines_since(mark)), srv.log.lines_since(mark)[-15:]
    held, subs, dropped = found(srv)
    st = stats(srv)
    assert (held + dropped, subs) == (100, 1), (held, subs, dropped)
    assert st["restore_dropped"] == dropped and st["restore_waiting"] == held, st
    assert st["events_restored"] == 0, st
    w = waiting_of(srv, ev)
    assert identity(w["socket"]) == identity(sock) and w["held"] == held, w
    assert 0 <= w["drop_in"] <= 300, w

    # subscribed again, and raised at once: the raise takes them before itself
    srv.subscribe(ev, sock)
    burst(srv, ev, 100, 20)
    wait_stat(srv, "events_spooled", 20)
    s2.bind()
    wait_until(lambda: 119 in seqs(s2, ev), 30, "the last new event")
    assert_quiet([s1, s2], [0, s2.count(ev)], ev)
    lost = check_replayed(seqs(s2, ev), range(100), range(100, 120), how, dropped)
    at_rest_kill(how, lost, range(100), dropped)
    st = stats(srv)
    assert (st["events_restored"], st["restore_waiting"]) == (held, 0), st
    assert st["restore_dropped"] == dropped and st["events_unpersisted"] == 0, st
    assert_counted(st)
    assert any(f"of event '{ev}': restored {held} held events" in l
               for l in srv.log.lines_since(srv.start_mark)), "the 'restored' NOTICE"
    view = restart_view(srv)

    # replayed is gone from the persistent memory too: nothing twice
    srv.restart(how)
    assert found(srv) == (0, 0, 0)
    assert stats(srv)["restore_waiting"] == 0
    assert {k: view.get(k) for k in ("restored", "waiting", "dropped")} == \
        {"restored": held, "waiting": 0, "dropped": dropped}, view


@pytest.mark.parametrize("how", ["term", "kill"])
def test_parallel_only_the_subscriber_that_was_down_gets_them(durable, recv, how):
    srv = durable()
    a, b, c = recv.udp(), recv.udp(), recv.dead()
    ev = srv.new_event()
    sock = virtual("PARALLEL SPOOL(200)", a, b, c)
    srv.subscribe(ev, sock)
    burst(srv, ev, 0, 50)
    a.wait_count(50, ev)
    b.wait_count(50, ev)
    wait_stat(srv, "spool_held", 50)

    srv.restart(how)
    held, subs, dropped = found(srv)
    assert (held + dropped, subs) == (50, 1), (held, subs, dropped)
    srv.subscribe(ev, sock)
    burst(srv, ev, 50, 5)
    for r in (a, b):
        r.wait_count(55, ev)
    c.bind()
    wait_until(lambda: 54 in seqs(c, ev), 30, "the last new event at c")
    assert_quiet([a, b, c], [55, 55, c.count(ev)], ev)
    for r in (a, b):
        assert seqs(r, ev) == list(range(55)), f"{r}: {seqs(r, ev)}"
    lost = check_replayed(seqs(c, ev), range(50), range(50, 55), how, dropped)
    at_rest_kill(how, lost, range(50), dropped)
    st = stats(srv)
    assert (st["events_restored"], st["restore_waiting"]) == (held, 0), st
    assert_counted(st)


@pytest.mark.parametrize("how", ["term", "kill"])
def test_hash_replays_each_event_where_its_own_key_goes(durable, recv, how):
    """HASH(i): the loop index is the key; the events raised after the
    start with the same keys go where the held ones went. (Fewer than a
    unix receiver's queue takes at once: a full one fails an event, which
    HASH then offers to the next subscriber.)"""
    srv = durable()
    subs = [recv.dead(), recv.dead()]
    ev = srv.new_event()
    sock = virtual("HASH(i) SPOOL(100)", *subs)
    srv.subscribe(ev, sock)
    burst(srv, ev, 0, 8)              # seq 0..7, key = seq
    wait_stat(srv, "spool_held", 8)

    srv.restart(how)
    held, _, dropped = found(srv)
    assert held + dropped == 8
    for s in subs:
        s.bind()
    srv.subscribe(ev, sock)
    wait_until(lambda: sum(s.count(ev) for s in subs) >= held, 30, "the held events")
    burst(srv, ev, 8, 8)              # seq 8..15, key = seq - 8
    wait_until(lambda: sum(s.count(ev) for s in subs) >= held + 8, 30, "every event")
    assert_quiet(subs, [s.count(ev) for s in subs], ev)
    for s in subs:
        mine = seqs(s, ev)
        check_replayed(mine, [n for n in range(8) if n in mine],
                       [n for n in range(8, 16) if n in mine], how, dropped)
    lost = check_replayed(sorted(seqs(subs[0], ev) + seqs(subs[1], ev)), range(8),
                          range(8, 16), how, dropped)
    at_rest_kill(how, lost, range(8), dropped)
    where = {seq(e): i for i, s in enumerate(subs) for e in s.events(ev)}
    moved = {k: (where[k], where[8 + k]) for k in range(8)
             if k in where and where[k] != where[8 + k]}
    assert not moved, f"key: (held event's subscriber, new event's) differ: {moved}"
    st = stats(srv)
    assert st["events_unkeyed"] == 0, st
    assert (st["events_restored"], st["restore_waiting"]) == (held, 0), st
    assert_counted(st)


@pytest.mark.parametrize("how", ["term", "kill"])
def test_round_robin_comes_back_under_another_spool_size(durable, recv, how):
    """The SPOOL option is not part of what identifies the held events."""
    srv = durable()
    subs = [recv.dead(), recv.dead(), recv.dead()]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN SPOOL(100)", *subs))
    burst(srv, ev, 0, 30)
    wait_stat(srv, "spool_held", 30)

    srv.restart(how)
    held, _, dropped = found(srv)
    assert held + dropped == 30
    assert identity(waiting_of(srv, ev)["socket"]) == virtual("ROUND-ROBIN", *subs)
    srv.subscribe(ev, virtual("ROUND-ROBIN SPOOL(60)", *subs))
    burst(srv, ev, 30, 5)
    wait_stat(srv, "events_spooled", 5)
    subs[1].bind()
    wait_until(lambda: 34 in seqs(subs[1], ev), 30, "the last new event")
    assert_quiet(subs, [0, subs[1].count(ev), 0], ev)
    lost = check_replayed(seqs(subs[1], ev), range(30), range(30, 35), how, dropped)
    at_rest_kill(how, lost, range(30), dropped)
    assert_counted(stats(srv))


def test_a_startup_route_subscription_claims_its_held_events(make_srv, recv, tmp_path):
    s1, s2 = recv.dead(), recv.dead()
    ev = "E_T39"   # of the harness's EVENT_POOL, raised by its script
    sock = virtual("FAILOVER SPOOL(100)", s1, s2)
    srv = make_srv(**durable_options(tmp_path / "evv.rpm", startup_subscriptions=[(ev, sock)]))
    burst(srv, ev, 0, 20)
    wait_stat(srv, "spool_held", 20)
    srv.restart("term")
    assert found(srv) == (20, 1, 0)
    s1.bind()
    wait_until(lambda: s1.count(ev) >= 20, 30, "20 held events, nothing raised")
    burst(srv, ev, 20, 1)
    s1.wait_count(21, ev)
    assert_quiet([s1, s2], [21, 0], ev)
    assert seqs(s1, ev) == list(range(21))
    st = stats(srv)
    assert (st["events_restored"], st["restore_waiting"], st["restore_dropped"]) == (20, 0, 0)


# ---- crashes in the middle of things -------------------------------------

def test_kill_while_events_are_raised(durable, recv):
    """One event raised over MI, each held before the next (so which ones
    were accepted before the kill is known), another in bursts from the
    workers meanwhile; every process is killed in the middle of it."""
    srv = durable()
    m1, m2, w1, w2 = recv.dead(), recv.dead(), recv.dead(), recv.dead()
    mev, wev = srv.new_event(), srv.new_event()
    msock = virtual("FAILOVER SPOOL(5000)", m1, m2)
    wsock = virtual("FAILOVER SPOOL(5000)", w1, w2)
    srv.subscribe(mev, msock)
    srv.subscribe(wev, wsock)
    acked = [0]
    stop = threading.Event()
    client = srv.mi_client          # this server's: never the next one's

    def mi_raiser():
        n = 0
        try:
            while not stop.is_set():
                client.call("raise_event", {"event": mev, "params": f'{{"seq": {n}}}'},
                            timeout=2)
                wait_until(lambda: client.call("event_virtual_list", {"event": mev}, timeout=2)
                           ["Subscriptions"][0]["Spool"]["spooled"] > n, 10, f"seq {n} held")
                n += 1
                acked[0] = n
        except Exception:  # the kill
            return
    t = threading.Thread(target=mi_raiser, daemon=True)
    t.start()
    bursts = 0
    while acked[0] < 150:
        srv.send_sip(wev, count=20, tag=f"b{bursts}")
        bursts += 1
        wait_until(lambda: acked[0] >= 1 + bursts * 2 or acked[0] >= 150, 20, "MI raises")
    srv.kill_all()           # the MI raiser's next call fails: it ends
    stop.set()
    t.join(15)
    assert not t.is_alive()
    accepted = acked[0]        # held before the kill; the next one may be too

    srv.start()
    held, subs, dropped = found(srv)
    st = stats(srv)
    assert st["restore_dropped"] == dropped and st["restore_waiting"] == held, (st, held)
    # in doubt: at most one a queue (2); torn: at most one a writing process
    # (the 2 workers)
    assert dropped <= 2 + 2, f"restore_dropped {dropped}"
    for r in (m1, w1):
        r.bind()
    srv.subscribe(mev, msock)
    srv.subscribe(wev, wsock)
    wait_until(lambda: m1.count(mev) + w1.count(wev) >= held, 30,
               f"{held} restored events delivered")
    assert_quiet([m1, w1, m2, w2], [m1.count(mev), w1.count(wev), 0, 0])
    st = stats(srv)
    assert st["events_restored"] == held == m1.count(mev) + w1.count(wev), (st, held)
    assert st["restore_waiting"] == 0, st

    got = seqs(m1, mev)
    lost = check_replayed(got, range(accepted), [], "kill", dropped, maybe=[accepted])
    assert len(lost) <= dropped, (lost, dropped)
    # the workers': in each raising process's order (burst, i), each once
    wgot = [(e["params"]["pid"], int(e["params"]["tag"][1:]), int(e["params"]["i"]))
            for e in w1.events(wev)]
    assert len(wgot) == len(set(wgot)), "a worker's event delivered twice"
    for pid in {p for p, _, _ in wgot}:
        mine = [(b, i) for p, b, i in wgot if p == pid]
        assert mine == sorted(mine), f"worker {pid}: out of order {mine}"
    assert all(b < bursts and i < 20 for _, b, i in wgot)
    assert_counted(st)


def test_kill_during_a_replay(durable, recv):
    """The replay process delivering held events to a slow subscriber (its
    queue full: EAGAIN, retried) when every process is killed."""
    srv = durable()
    s0, r = recv.dead(), recv.dead(delay=0.002)
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(2000)", s0, r)
    srv.subscribe(ev, sock)
    burst(srv, ev, 0, 1000)
    wait_stat(srv, "spool_held", 1000)
    r.bind()
    wait_until(lambda: r.count(ev) >= 100, 30, "the replay under way")
    srv.kill_all()
    settled(r)
    before = r.count(ev)
    assert before < 1000, "the replay was over before the kill: nothing tested"

    srv.start()
    held, _, dropped = found(srv)
    assert dropped <= 1, f"one queue, one event attempted at a time: restore_dropped {dropped}"
    r.delay = 0
    srv.subscribe(ev, sock)
    burst(srv, ev, 1000, 10)
    wait_until(lambda: 1009 in seqs(r, ev), 30, "the last new event")
    assert_quiet([s0, r], [0, r.count(ev)], ev)
    got = seqs(r, ev)
    lost = check_replayed(got, range(1000), range(1000, 1010), "kill", dropped)
    # one delivered and not yet taken off its queue at the kill: dropped as
    # in doubt, though it arrived
    assert dropped - len(lost) in (0, 1), (lost, dropped)
    st = stats(srv)
    assert st["events_restored"] == held == len(got) - before - 10, (st, held, before, len(got))
    assert_counted(st)


def test_the_event_in_flight_at_a_kill_is_dropped_and_counted(durable, recv):
    """An asynchronous subscriber that has an attempt of the head and does
    not answer yet: the kill leaves it in doubt (it may have arrived). It
    is not offered again after the start; the others are, in order."""
    srv = durable(stream_timeout=60000)
    rpc = recv.tcp("error")
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(100)", rpc)
    srv.subscribe(ev, sock)
    # held in the raise's order: the first alone, then the rest behind it
    # (raised live together, they would be held in their reports' order)
    burst(srv, ev, 0, 1)
    wait_stat(srv, "spool_held", 1)
    burst(srv, ev, 1, 9)
    wait_stat(srv, "spool_held", 10)
    rpc.set_mode("hold")
    wait_until(lambda: rpc.held(), 15, "an attempt the subscriber holds")
    [req] = rpc.held()
    assert seq({"params": req["params"]}) == 0, req
    srv.kill_all()
    before = len(rpc.events(ev))

    srv.start()
    assert found(srv) == (9, 1, 1)
    line = [l for l in srv.log.lines_since(srv.start_mark) if "restart persistency: found" in l]
    assert "1 in flight at the stop" in line[0], line
    rpc.set_mode("ok")
    srv.subscribe(ev, sock)
    burst(srv, ev, 10, 1)
    wait_until(lambda: len(rpc.answered(ev, "ok")) >= 10, 30, "the 9 kept and the new one")
    assert_quiet([rpc], [rpc.count(ev)], ev)
    assert [seq(e) for e in rpc.events(ev)[before:]] == list(range(1, 11))
    st = stats(srv)
    assert (st["events_restored"], st["restore_dropped"], st["restore_waiting"]) == (9, 1, 0), st
    assert_counted(st)


# ---- a subscription that never comes back --------------------------------

def test_held_events_not_claimed_within_the_grace_are_dropped(durable, recv):
    srv = durable(grace=2)
    gone, back = [recv.dead(), recv.dead()], [recv.dead(), recv.dead()]
    ev_gone, ev_back = srv.new_event(), srv.new_event()
    sock_gone = virtual("FAILOVER SPOOL(100)", *gone)
    sock_back = virtual("ROUND-ROBIN SPOOL(100)", *back)
    srv.subscribe(ev_gone, sock_gone)
    srv.subscribe(ev_back, sock_back)
    burst(srv, ev_gone, 0, 10)
    burst(srv, ev_back, 0, 5)
    wait_stat(srv, "spool_held", 15)

    srv.restart("term")
    assert found(srv) == (15, 2, 0)
    w = waiting_of(srv, ev_gone)
    assert identity(w["socket"]) == identity(sock_gone) and w["held"] == 10, w
    assert 0 <= w["drop_in"] <= 2, w
    srv.subscribe(ev_back, sock_back)
    back[0].bind()
    wait_until(lambda: back[0].count(ev_back) >= 5, 30, "the claimed ones")
    wait_until(lambda: stats(srv)["restore_dropped"] >= 10, 15, "the grace to end")
    st = stats(srv)
    assert (st["restore_dropped"], st["restore_waiting"], st["events_restored"]) == (10, 0, 5), st
    assert seqs(back[0], ev_back) == list(range(5))
    warn = [l for l in srv.log.lines_since(srv.start_mark) if "was not subscribed again" in l]
    assert len(warn) == 1 and "WARN" in warn[0], warn
    assert f"of event '{ev_gone}' was not subscribed again within 2 s: 10 held events dropped" \
        in warn[0], warn
    quoted = re.search(r"'(virtual:[^']*)' of event", warn[0])
    assert quoted and identity(quoted[1]) == identity(sock_gone), warn
    # coming back later gets nothing of them
    srv.subscribe(ev_gone, sock_gone)
    gone[0].bind()
    burst(srv, ev_gone, 10, 1)
    gone[0].wait_count(1, ev_gone)
    assert_quiet(gone, [1, 0], ev_gone)
    assert seqs(gone[0], ev_gone) == [10]
    assert restart_view(srv)["Waiting"] == []
    assert_view(srv, restored=5, waiting=0, dropped=10)


# ---- what a start finds in the file ----------------------------------------

def region_offset(data):
    at = [m.start() for m in re.finditer(re.escape(MAGIC), data)]
    assert len(at) == 1, f"the module's region: {len(at)} times {MAGIC!r} in the file"
    return at[0]


def hold_then_stop(srv, recv, n=10, **params):
    """A FAILOVER subscription over two dead receivers holding n events
    (raised over MI with params, formatted with the seq), then a clean
    stop. Returns (event, socket, receivers)."""
    subs = [recv.dead(), recv.dead()]
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(100)", *subs)
    srv.subscribe(ev, sock)
    for k in range(n):
        raise_held(srv, ev, [k], **{p: v.format(k) for p, v in params.items()})
    srv.stop_clean()
    return ev, sock, subs


def nothing_old_comes_back(srv, ev, sock, subs, n):
    """Subscribed again, the first receiver back gets the new event n only."""
    srv.subscribe(ev, sock)
    subs[0].bind()
    burst(srv, ev, n, 1)
    subs[0].wait_count(1, ev)
    assert_quiet(subs, [1, 0], ev)
    assert seqs(subs[0], ev) == [n]


def region_still_works(srv, recv):
    """The region is this module's again, whole: what is held now is
    found at the next start."""
    ev, _, _ = hold_then_stop(srv, recv, n=5)
    srv.start()
    assert found(srv) == (5, 1, 0)
    assert waiting_of(srv, ev)["held"] == 5


def test_a_region_of_another_layout_is_dropped_and_counted(durable, recv):
    srv = durable()
    ev, sock, subs = hold_then_stop(srv, recv)
    data = bytearray(srv.rpm.read_bytes())
    at = region_offset(data) + len(MAGIC)
    version = int.from_bytes(data[at:at + 4], "little")
    data[at:at + 4] = (version + 1).to_bytes(4, "little")
    srv.rpm.write_bytes(data)

    srv.start()
    no_crash(srv)
    assert any("WARN" in l and "restart persistency" in l
               for l in srv.log.lines_since(srv.start_mark)), "a WARNING says why"
    held, subs_found, dropped = found(srv)
    st = stats(srv)
    assert (held, subs_found) == (0, 0), (held, subs_found, dropped)
    assert st["restore_dropped"] == dropped and st["restore_waiting"] == 0, st
    assert dropped >= 1, f"a region of another layout dropped and not counted: {st}"
    nothing_old_comes_back(srv, ev, sock, subs, 10)
    srv.stop_clean()
    srv.start()
    assert found(srv) == (0, 0, 0)
    region_still_works(srv, recv)


def test_a_corrupt_record_is_dropped_and_the_others_kept(durable, recv):
    srv = durable()
    ev, sock, subs = hold_then_stop(srv, recv, mark="MARK{:04d}PAYLOAD")
    data = srv.rpm.read_bytes()
    start = region_offset(data)
    target = b"MARK0004PAYLOAD"
    hits = [m.start() for m in re.finditer(target, data) if m.start() > start]
    assert hits, f"the held event's parameter {target!r} is not in the file"
    data = bytearray(data)
    for h in hits:
        data[h + len(target) - 1] ^= 0x01  # ...PAYLOAE
    srv.rpm.write_bytes(data)

    srv.start()
    no_crash(srv)
    assert found(srv) == (9, 1, 1)
    assert stats(srv)["restore_dropped"] == 1
    srv.subscribe(ev, sock)
    subs[0].bind()
    raise_held(srv, ev, [10], mark="MARK0010PAYLOAD")
    wait_until(lambda: 10 in seqs(subs[0], ev), 30, "the new event")
    assert_quiet(subs, [subs[0].count(ev), 0], ev)
    assert seqs(subs[0], ev) == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert all(e["params"]["mark"] == f"MARK{seq(e):04d}PAYLOAD" for e in subs[0].events(ev))


def test_garbage_behind_the_region_header_is_survived(durable, recv):
    """Random bytes over the whole region but its magic and version:
    nothing that is not a whole, checked record comes out of it."""
    srv = durable()
    ev, sock, subs = hold_then_stop(srv, recv)
    data = bytearray(srv.rpm.read_bytes())
    at = region_offset(data) + 16
    size = int(MEMORY.rstrip("M")) * 1024 * 1024 - 4096
    data[at:at + size] = os.urandom(size)
    srv.rpm.write_bytes(data)

    srv.start()
    no_crash(srv)
    held, _, dropped = found(srv)
    assert held == 0, f"{held} held events found in random bytes"
    assert stats(srv)["restore_dropped"] == dropped
    nothing_old_comes_back(srv, ev, sock, subs, 10)
    region_still_works(srv, recv)


@pytest.mark.parametrize("damage", ["random", "random-size", "truncated", "empty"])
def test_a_file_the_core_refuses_gives_an_empty_start(durable, recv, damage):
    """The core checks the file (its magic, size) and makes a new one: the
    module finds no region, says so, and starts empty."""
    srv = durable()
    ev, sock, subs = hold_then_stop(srv, recv)
    data = srv.rpm.read_bytes()
    srv.rpm.write_bytes({"random": lambda: os.urandom(len(data)),
                         "random-size": lambda: os.urandom(12345),
                         "truncated": lambda: data[:len(data) // 2],
                         "empty": lambda: b""}[damage]())

    srv.start()
    no_crash(srv)
    assert found(srv) == (0, 0, 0)
    st = stats(srv)
    assert (st["restore_dropped"], st["restore_waiting"], st["events_restored"]) == (0, 0, 0), st
    nothing_old_comes_back(srv, ev, sock, subs, 10)
    region_still_works(srv, recv)


def test_a_full_region_keeps_the_excess_in_memory_only(durable, recv):
    """A region is as large as the memory budget, and a held event takes
    less of it than of the budget; it fills with what waits for a
    subscription that is not back yet (outside the budget) plus what is
    held now. Each start holds well within the budget on a new
    subscription, until the region has no room for all of it."""
    srv = durable(memory="64K")
    pad = "x" * 100
    runs = []      # (event, socket, receivers, held, kept)
    for _ in range(5):
        rs = [recv.dead(), recv.dead()]
        ev = srv.new_event()
        sock = virtual("FAILOVER SPOOL(10000)", *rs)
        srv.subscribe(ev, sock)
        n = 0
        while stats(srv)["spool_memory"] < 40 * 1024:
            burst(srv, ev, n, 10, pad)
            n += 10
            wait_stat(srv, "events_spooled", n)
        st = stats(srv)
        assert st["events_dropped"] == 0 and st["spool_held"] == n, st
        kept = n - st["events_unpersisted"]
        runs.append((ev, sock, rs, n, kept))
        mark = srv.log.mark()
        srv.stop_clean()
        said = [l for l in srv.log.lines_since(mark) if "shutdown:" in l]
        srv.start()
        no_crash(srv)
        assert found(srv) == (sum(r[4] for r in runs), len(runs), 0), runs
        assert any(f"shutdown: {kept} held events kept for the next start" in l
                   for l in said), (said, runs)
        if kept < n:
            break
    else:
        pytest.fail(f"the region never filled: {runs}")

    # one subscription back at a time: together, what waited is more than
    # the memory budget holds, and a queue put back is held within it
    for ev, sock, rs, n, kept in runs:
        srv.subscribe(ev, sock)
        rs[0].bind()
        wait_until(lambda: rs[0].count(ev) >= kept, 30, f"{kept} events of {ev}")
        assert_quiet(rs, [kept, 0], ev)
        assert seqs(rs[0], ev) == list(range(kept)), "the oldest ones kept, in order"
    st = stats(srv)
    assert (st["events_restored"], st["restore_waiting"], st["restore_dropped"]) == \
        (sum(r[4] for r in runs), 0, 0), st
    # drained: the region has room again
    ev, sock, rs, n, kept = runs[-1]
    rs[0].unbind()
    burst(srv, ev, n, 50, pad)
    wait_stat(srv, "spool_held", 50)
    assert stats(srv)["events_unpersisted"] == 0


# ---- on, with nothing held; off; refused ---------------------------------

def test_persistency_on_with_nothing_held_changes_nothing(durable, recv):
    srv = durable()
    assert found(srv) == (0, 0, 0)
    a, b = recv.udp(), recv.udp()
    fo, par = srv.new_event(), srv.new_event()
    srv.subscribe(fo, virtual("FAILOVER SPOOL(100)", a, b))
    srv.subscribe(par, virtual("PARALLEL SPOOL(100)", a, b))
    burst(srv, fo, 0, 20)
    burst(srv, par, 0, 20)
    a.wait_count(20, fo)
    for r in (a, b):
        r.wait_count(20, par)
    assert_quiet([a, b], [40, 20])
    assert seqs(a, fo) == seqs(a, par) == seqs(b, par) == list(range(20))
    st = stats(srv)
    assert st["events_spooled"] == st["spool_held"] == st["events_unpersisted"] == 0, st
    assert st["events_failed"] == 0, st
    assert restart_view(srv)["Waiting"] == []
    srv.restart("term")
    assert found(srv) == (0, 0, 0)
    assert_view(srv, restored=0, waiting=0, dropped=0)
    assert not [l for l in srv.log.lines_since(0) if "held events kept" in l], \
        "a line about nothing kept"


def test_persistency_off_keeps_nothing(make_srv, recv, tmp_path):
    rpm = tmp_path / "evv.rpm"
    srv = make_srv(**durable_options(rpm, persist=0))
    ev, sock, subs = hold_then_stop(srv, recv, n=5)
    assert any("shutdown: 5 held events dropped" in l
               for l in srv.log.lines_since(srv.start_mark)), srv.log.tail(15)
    assert not rpm.exists(), "restart_persistency 0 made the cache file"
    srv.start()
    assert not [l for l in srv.log.lines_since(srv.start_mark) if "restart persistency" in l]
    nothing_old_comes_back(srv, ev, sock, subs, 5)


def test_a_cache_smaller_than_the_region_refuses_the_start(tmp_path):
    srv = OpenSips(tmp_path / "srv", **durable_options(tmp_path / "evv.rpm", memory="4M",
                                                       rpm_mb=2))
    try:
        assert not srv.try_start(), "started with a 2 MB cache for a 4 MB region"
        errors = srv.log.errors_since(srv.start_mark, module="event_virtual")
        assert len(errors) == 1, errors
    finally:
        srv.stop()
