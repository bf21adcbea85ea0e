"""Observability: MI event_virtual_list, get_statistics event_virtual:, the
WARNING/NOTICE health log lines, and the same output read with the
`opensips-mi` client from PyPI's `opensips` package.

Every expected number is what this test made happen. Statistics are taken
as before/after deltas (the servers here are shared by the tests of this
file, which run one after another).
"""

import json
import re
import subprocess
import sys
import time

import pytest
from opensips.mi import OpenSIPSMI, OpenSIPSMIException

from evvharness import CLUSTER_STATS, SPOOL_STATS, VIRTUAL_STATS, MIError, raise_one, stats_delta, virtual, wait_until

# the shared `srv` and `own_srv` servers of this file: short, for the
# recovery test. The exact "skipped" checks run on a server with
# failover_timeout=30 (marker srv30): a failed subscriber stays skipped for
# the whole test, so its counters are exact.
pytestmark = pytest.mark.server(failover_timeout=1)
srv30 = pytest.mark.server(failover_timeout=30)


def only_subscription(srv, event, sock):
    subs = srv.virtual_list(event)
    assert [s["socket"] for s in subs] == [sock], subs
    return subs[0]


def wait_stats(srv, before, n_events, timeout=5):
    """Raises run in workers and are counted when they end: wait until the
    `events` counter moved by n_events and the event outcomes add up."""
    def settled():
        d = stats_delta(before, srv.virtual_stats())
        if d["events"] >= n_events and (
                d["events_delivered"] + d["events_failed"] + d["events_incomplete"]
                >= d["events"]):
            return d
        return None
    return wait_until(settled, timeout, f"{n_events} events counted in event_virtual: statistics")


def counters(sub):
    return (sub["attempts"], sub["failures"])


# --------------------------------------------------------------------------
# event_virtual_list and statistics
# --------------------------------------------------------------------------

@srv30
def test_parallel_dead_and_healthy_counted_exactly(srv, recv):
    dead, live = recv.dead(), recv.udp()
    ev = srv.new_event()
    sock = virtual("PARALLEL", live, dead)
    srv.subscribe(ev, sock, expire=120)
    n = 7
    before = srv.virtual_stats()
    t0 = time.time()
    srv.send_sip(ev, count=n, tag="par")   # raised in a worker process
    live.wait_count(n, ev)
    d = wait_stats(srv, before, n)
    assert d == {"events": n, "events_delivered": 0, "events_failed": 0,
                 "events_incomplete": n, "failovers": 0, "events_unkeyed": 0}, d

    s = only_subscription(srv, ev, sock)
    assert s["event"] == ev and s["policy"] == "PARALLEL"
    assert s["expire"] == 120
    assert "next" not in s, "only ROUND-ROBIN has a rotation position"
    assert [x["socket"] for x in s["Subscribers"]] == [live.socket, dead.socket]
    healthy, skipped = s["Subscribers"]
    assert healthy["state"] == "healthy" and counters(healthy) == (n, 0), healthy
    assert "skipped_for_ms" not in healthy and "skipped_until" not in healthy
    assert skipped["state"] == "skipped" and counters(skipped) == (n, n), skipped
    assert 0 < skipped["skipped_for_ms"] <= 30000, skipped
    until = skipped["skipped_until"]
    # the window runs from the last failure: between t0 + 30 and now + 30
    assert int(t0) + 30 - 1 <= until <= int(time.time()) + 30 + 1, (until, t0)
    left_ms = (until - time.time()) * 1000
    assert abs(skipped["skipped_for_ms"] - left_ms) <= 2500, (skipped, left_ms)


@srv30
def test_failover_dead_first_is_skipped_and_counted(srv, recv):
    dead, a, b = recv.dead(), recv.udp(), recv.udp()
    ev = srv.new_event()
    sock = virtual("FAILOVER", dead, a, b)
    srv.subscribe(ev, sock)
    before = srv.virtual_stats()
    n = 6
    for i in range(n):
        assert raise_one(srv, ev, i, [dead, a, b]) == [1]
    d = wait_stats(srv, before, n)
    # the first event fails on `dead` and moves on (one failover); the
    # next ones skip it (inside its 30 s window)
    assert d == {"events": n, "events_delivered": n, "events_failed": 0,
                 "events_incomplete": 0, "failovers": 1, "events_unkeyed": 0}, d

    s = only_subscription(srv, ev, sock)
    assert s["policy"] == "FAILOVER" and "next" not in s
    d0, d1, d2 = s["Subscribers"]
    assert (d0["socket"], d1["socket"], d2["socket"]) == (dead.socket, a.socket, b.socket)
    assert d0["state"] == "skipped" and counters(d0) == (1, 1), d0
    assert 25000 < d0["skipped_for_ms"] <= 30000, d0
    assert abs(d0["skipped_until"] - (time.time() + d0["skipped_for_ms"] / 1000)) <= 2, d0
    assert d1["state"] == "healthy" and counters(d1) == (n, 0), d1
    assert d2["state"] == "healthy" and counters(d2) == (0, 0), d2


@srv30
def test_round_robin_next_position_and_attempts(srv, recv):
    subs = recv.udp(3)
    ev = srv.new_event()
    sock = virtual("ROUND-ROBIN", *subs)
    srv.subscribe(ev, sock)
    s = only_subscription(srv, ev, sock)
    assert s["policy"] == "ROUND-ROBIN" and s["next"] == 0, s
    before = srv.virtual_stats()
    for i in range(7):
        assert raise_one(srv, ev, i, subs) == [i % 3]
        d = wait_stats(srv, before, i + 1)
        assert d["events"] == i + 1
        s = only_subscription(srv, ev, sock)
        assert s["next"] == (i + 1) % 3, f"after {i + 1} events: {s}"
        want = [(i + 1) // 3 + (1 if k < (i + 1) % 3 else 0) for k in range(3)]
        assert [counters(x) for x in s["Subscribers"]] == [(w, 0) for w in want], s
        assert all(x["state"] == "healthy" for x in s["Subscribers"]), s
    assert d == {"events": 7, "events_delivered": 7, "events_failed": 0,
                 "events_incomplete": 0, "failovers": 0, "events_unkeyed": 0}, d


@srv30
def test_round_robin_with_dead_subscriber(srv, recv):
    a, dead, b = recv.udp(), recv.dead(), recv.udp()
    subs = [a, dead, b]
    ev = srv.new_event()
    sock = virtual("ROUND-ROBIN", *subs)
    srv.subscribe(ev, sock)
    before = srv.virtual_stats()
    n = 10
    for i in range(n):
        got = raise_one(srv, ev, i, subs)
        assert got in ([0], [2]), f"event {i} went to {got}"
    d = wait_stats(srv, before, n)
    # event 1 starts at the dead one, fails and moves on: one failover; then
    # the dead one is passed over for 30 s
    assert d == {"events": n, "events_delivered": n, "events_failed": 0,
                 "events_incomplete": 0, "failovers": 1, "events_unkeyed": 0}, d
    s = only_subscription(srv, ev, sock)
    sa, sd, sb = s["Subscribers"]
    assert sd["state"] == "skipped" and counters(sd) == (1, 1), sd
    assert sa["failures"] == 0 and sb["failures"] == 0
    assert (sa["attempts"], sb["attempts"]) == (a.count(ev), b.count(ev)) 
    assert sa["attempts"] + sb["attempts"] == n
    assert abs(sa["attempts"] - sb["attempts"]) <= 1, s
    assert 0 <= s["next"] < 3


@srv30
def test_all_subscribers_dead_counts_failed_events(srv, recv):
    d1, d2 = recv.dead(), recv.dead()
    ev = srv.new_event()
    sock = virtual("FAILOVER", d1, d2)
    srv.subscribe(ev, sock)
    before = srv.virtual_stats()
    n = 4
    srv.send_sip(ev, count=n)
    d = wait_stats(srv, before, n)
    # every subscriber failed recently: each event is still tried on both
    assert d == {"events": n, "events_delivered": 0, "events_failed": n,
                 "events_incomplete": 0, "failovers": n, "events_unkeyed": 0}, d
    s = only_subscription(srv, ev, sock)
    assert [(x["state"],) + counters(x) for x in s["Subscribers"]] == [
        ("skipped", n, n), ("skipped", n, n)], s


@srv30
def test_filter_by_event(srv, recv):
    a, b, c = recv.udp(3)
    ev1, ev2 = srv.new_event(), srv.new_event()
    s1 = virtual("FAILOVER", a, b)
    s2 = virtual("PARALLEL", b, c)
    s3 = virtual("ROUND-ROBIN", c, a)
    srv.subscribe(ev1, s1)
    srv.subscribe(ev1, s2)
    srv.subscribe(ev2, s3)
    srv.subscribe(ev1, a.socket)   # a direct subscriber is no virtual one

    l1 = srv.virtual_list(ev1)
    assert sorted(s["socket"] for s in l1) == sorted([s1, s2]), l1
    assert {s["event"] for s in l1} == {ev1}
    l2 = srv.virtual_list(ev2)
    assert [s["socket"] for s in l2] == [s3] and l2[0]["event"] == ev2, l2

    everything = {(s["event"], s["socket"]) for s in srv.virtual_list()}
    assert {(ev1, s1), (ev1, s2), (ev2, s3)} <= everything
    assert (ev1, a.socket) not in everything and (ev1, "udp:" + a.socket) not in everything
    assert all(s["socket"].startswith("virtual:") for s in srv.virtual_list())

    # an event with no subscription at all: an empty list, not an error
    ev3 = srv.new_event()
    assert srv.virtual_list(ev3) == []


@srv30
def test_unknown_event_is_an_error(srv):
    with pytest.raises(MIError) as err:
        srv.mi("event_virtual_list", {"event": "E_NO_SUCH_EVENT_EVV"})
    assert err.value.code == 404, err.value.error
    assert "E_NO_SUCH_EVENT_EVV" in (err.value.message or ""), err.value.error


@srv30
def test_expired_and_unsubscribed_not_listed(srv, recv):
    a, b = recv.udp(2)
    ev = srv.new_event()
    keep = virtual("FAILOVER", a, b)
    gone = virtual("ROUND-ROBIN", a, b)
    short = virtual("PARALLEL", a, b)
    srv.subscribe(ev, keep, expire=300)
    srv.subscribe(ev, gone, expire=300)
    srv.subscribe(ev, short, expire=1)
    assert sorted(s["socket"] for s in srv.virtual_list(ev)) == sorted([keep, gone, short])
    srv.unsubscribe(ev, gone)
    # the core drops an unsubscribed (expire 0) or expired subscription
    # once its second is over
    wait_until(lambda: [s["socket"] for s in srv.virtual_list(ev)] == [keep], 5,
               "the unsubscribed and the expired subscription to leave event_virtual_list")
    assert srv.subscribers(ev) == [keep]
    assert [s["socket"] for s in srv.virtual_list() if s["event"] == ev] == [keep]
    s = srv.virtual_list(ev)[0]
    assert s["expire"] == 300


# --------------------------------------------------------------------------
# log lines
# --------------------------------------------------------------------------

def test_the_start_says_which_release_it_was_built_for(srv):
    # mod_init's two lines: the C module's, then which build this is
    server = srv.mi("version")["Server"]
    text = srv.log.text()
    assert re.search(r"NOTICE:event_virtual:\S+: initializing module \.\.\.$", text, re.M), text
    m = re.search(r"NOTICE:event_virtual:\S+: event_virtual (\S+) \(Rust\), "
                  r"built for OpenSIPS (\S+)$", text, re.M)
    assert m and m.group(1) == "0.1.0", text
    assert f"({m.group(2)} (" in server, (m.group(2), server)


def _lines(srv, mark, level, sub, vsock):
    pat = re.compile(
        rf"{level}:event_virtual:.*subscriber '{re.escape(sub)}' of '{re.escape(vsock)}'")
    return [l for l in srv.log.lines_since(mark) if pat.search(l)]


def test_failing_logged_once_recovery_once(own_srv, recv):
    srv = own_srv                     # failover_timeout = 1
    dead, live = recv.dead(), recv.udp()
    ev = srv.new_event()
    sock = virtual("FAILOVER", dead, live)
    mark = srv.log.mark()
    srv.subscribe(ev, sock)

    # many events, over several failover windows: `dead` is tried again after
    # each window and fails again, yet the change to failing is logged once
    sent = 0
    for rnd in range(3):
        srv.send_sip(ev, count=20, tag=f"r{rnd}")
        sent += 20
        live.wait_count(sent, ev)
        if rnd < 2:
            t = time.monotonic()
            wait_until(lambda: srv.virtual_list(ev)[0]["Subscribers"][0]["state"] == "failing",
                       3, "the dead subscriber's window to end")
            assert time.monotonic() - t < 2.5
    s = srv.virtual_list(ev)[0]["Subscribers"][0]
    assert s["failures"] >= 3 and s["attempts"] == s["failures"], s
    warns = _lines(srv, mark, "WARNING", dead.socket, sock)
    assert len(warns) == 1 and warns[0].rstrip().endswith("is failing"), (
        f"expected one WARNING for {dead.socket} after {s['failures']} failures:\n"
        + "\n".join(warns))
    assert _lines(srv, mark, "NOTICE", dead.socket, sock) == []
    assert srv.log.errors_since(mark, module="event_virtual") == [], \
        "no event was lost: no ERROR from event_virtual expected"

    # bring it to life: after its window, the next event reaches it
    dead.bind()
    seq = iter(range(1000))
    wait_until(lambda: raise_one(srv, ev, next(seq), [dead, live]) == [0], 5,
               "an event to reach the recovered subscriber", interval=0.1)
    for _ in range(10):
        assert raise_one(srv, ev, next(seq), [dead, live]) == [0]
    notices = wait_until(lambda: _lines(srv, mark, "NOTICE", dead.socket, sock), 3,
                         "the NOTICE line of the recovery")
    assert len(notices) == 1 and notices[0].rstrip().endswith("has recovered"), notices
    assert len(_lines(srv, mark, "WARNING", dead.socket, sock)) == 1
    s = srv.virtual_list(ev)[0]["Subscribers"][0]
    assert s["state"] == "healthy" and "skipped_for_ms" not in s, s


def test_parallel_dead_subscriber_no_error_per_event(own_srv, recv):
    srv = own_srv
    dead, live = recv.dead(), recv.udp()
    ev = srv.new_event()
    sock = virtual("PARALLEL", live, dead)
    srv.subscribe(ev, sock)
    mark = srv.log.mark()
    before = srv.virtual_stats()
    n = 30
    srv.send_sip(ev, count=n)
    live.wait_count(n, ev)
    d = wait_stats(srv, before, n)
    assert (d["events"], d["events_incomplete"]) == (n, n), d
    assert srv.log.errors_since(mark, module="event_virtual") == [], (
        "a PARALLEL event a subscriber missed must not log an ERROR each time")
    warns = _lines(srv, mark, "WARNING", dead.socket, sock)
    assert len(warns) == 1, warns


# --------------------------------------------------------------------------
# the opensips-mi client (PyPI package `opensips`)
# --------------------------------------------------------------------------

def _run_opensips_mi(srv, tmp_path, *args):
    # cwd: the client reads a `.env` from its working directory
    return subprocess.run([sys.executable, "-m", "opensips.mi", "-t", "datagram",
                           "-i", "127.0.0.1", "-p", str(srv.mi_port), "-dt", "5", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)


@srv30
def test_opensips_mi_client_reads_the_list_and_statistics(srv, recv, tmp_path):
    dead, a, b = recv.dead(), recv.udp(), recv.udp()
    ev = srv.new_event()
    sock = virtual("ROUND-ROBIN", a, dead, b)
    srv.subscribe(ev, sock, expire=200)
    for i in range(3):
        raise_one(srv, ev, i, [a, dead, b])
    wanted = srv.virtual_list(ev)

    proc = _run_opensips_mi(srv, tmp_path, "-j", json.dumps({"event": ev}), "event_virtual_list")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    got = out["Subscriptions"]
    assert len(got) == 1
    g, w = got[0], wanted[0]
    for k in ("event", "socket", "policy", "next"):
        assert g[k] == w[k], (k, g, w)
    assert g["socket"] == sock
    assert abs(g["expire"] - w["expire"]) <= 1 if isinstance(g["expire"], int) else g["expire"] == w["expire"]
    assert [(x["socket"], x["state"], x["attempts"], x["failures"]) for x in g["Subscribers"]] == \
        [(x["socket"], x["state"], x["attempts"], x["failures"]) for x in w["Subscribers"]]
    assert g["Subscribers"][1]["state"] == "skipped"
    assert isinstance(g["Subscribers"][1]["skipped_for_ms"], int)
    assert isinstance(g["Subscribers"][1]["skipped_until"], int)

    # positional parameters, as an operator types them
    proc = _run_opensips_mi(srv, tmp_path, "event_virtual_list", ev)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [s["socket"] for s in json.loads(proc.stdout)["Subscriptions"]] == [sock]

    # statistics
    proc = _run_opensips_mi(srv, tmp_path, "-s", "event_virtual:")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    st = json.loads(proc.stdout)
    assert sorted(st) == sorted(f"event_virtual:{s}" for s in VIRTUAL_STATS + SPOOL_STATS
                                                    + CLUSTER_STATS), st
    assert {k.split(":", 1)[1]: v for k, v in st.items()} == srv.virtual_stats()

    # an unknown event: the client reports the error and exits non-zero
    proc = _run_opensips_mi(srv, tmp_path, "event_virtual_list", "E_NO_SUCH_EVENT_EVV")
    assert proc.returncode != 0
    assert "404" in proc.stdout and "E_NO_SUCH_EVENT_EVV" in proc.stdout, proc.stdout


@srv30
def test_opensips_mi_python_api(srv, recv):
    a, b = recv.udp(2)
    ev = srv.new_event()
    sock = virtual("PARALLEL", a, b)
    srv.subscribe(ev, sock)
    raise_one(srv, ev, 0, [a, b], copies=2)

    mi = OpenSIPSMI("datagram", datagram_ip="127.0.0.1", datagram_port=srv.mi_port,
                    datagram_timeout=5)
    res = mi.execute("event_virtual_list", {"event": ev})
    [s] = res["Subscriptions"]
    assert (s["event"], s["socket"], s["policy"]) == (ev, sock, "PARALLEL")
    assert [(x["socket"], x["state"], x["attempts"], x["failures"])
            for x in s["Subscribers"]] == [(a.socket, "healthy", 1, 0), (b.socket, "healthy", 1, 0)]
    st = mi.execute("get_statistics", {"statistics": ["event_virtual:"]})
    assert {k.split(":", 1)[1]: v for k, v in st.items()} == srv.virtual_stats()
    with pytest.raises(OpenSIPSMIException, match="404"):
        mi.execute("event_virtual_list", {"event": "E_NO_SUCH_EVENT_EVV"})
