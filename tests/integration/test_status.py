"""E_EVENT_VIRTUAL_STATUS (issue 19): one event per change of state, seen
by a UDP subscription: a subscriber going down and coming back, a spool
queue starting to hold, dropping and draining, a HASH event without its
key; a virtual subscription to the status event itself, whose subscribers
are dead, raises nothing about itself and leaves the server alive; and the
guide's event_route example, on every release (3.4: event_route is a
module, loaded)."""

import time
from pathlib import Path

import pytest

from evvharness import (OPENSIPS_SRC, OpenSips, assert_quiet, raise_one, virtual,
                        wait_until)

STATUS = "E_EVENT_VIRTUAL_STATUS"
pytestmark = pytest.mark.server(failover_timeout=1)
# a second status event for one change would come within this window (the
# first one came within milliseconds of its change)
QUIET = 1.0


def changes(status, n, what):
    """The first n status events, once there are n; then none more over
    QUIET."""
    wait_until(lambda: status.count(STATUS) >= n, 10, what)
    assert_quiet([status], [n], STATUS, window=QUIET)
    return [e["params"] for e in status.events(STATUS)]


def test_a_subscriber_going_down_and_coming_back(make_srv, recv):
    srv, status = make_srv(), recv.udp()
    srv.subscribe(STATUS, status.socket)
    s1, s2 = recv.dead(), recv.udp()
    ev = srv.new_event()
    sock = virtual("FAILOVER", s1, s2)
    srv.subscribe(ev, sock)
    for i in range(3):  # one change, whatever the number of events
        assert raise_one(srv, ev, i, [s1, s2]) == [1]
    [down] = changes(status, 1, "the status event of the failure")
    assert down == {"event": ev, "socket": sock, "subscriber": 0,
                    "subscriber_socket": s1.socket, "old_state": "healthy",
                    "new_state": "failing", "reason": "failure", "held": 0}, down
    s1.bind()
    seq = iter(range(3, 1000))
    wait_until(lambda: raise_one(srv, ev, next(seq), [s1, s2]) == [0], 10,
               "the first subscriber to take events again", interval=0.1)
    for _ in range(3):
        assert raise_one(srv, ev, next(seq), [s1, s2]) == [0]
    [_, up] = changes(status, 2, "the status event of the recovery")
    assert up == {**down, "old_state": "failing", "new_state": "healthy",
                  "reason": "recovery"}, up


def test_a_spool_holding_dropping_then_draining(make_srv, recv):
    srv = make_srv(failover_timeout=0, virtual_params={"spool_retry_interval": 50})
    status, s1 = recv.udp(), recv.dead()
    srv.subscribe(STATUS, status.socket)
    ev = srv.new_event()
    sock = virtual("FAILOVER SPOOL(2)", s1)
    srv.subscribe(ev, sock)
    for i in range(5):
        srv.raise_event(ev, {"seq": i})
    # the drops are one episode, said once it has been quiet for 5 s
    seen = changes(status, 3, "failure, holding and the drop episode")
    common = {"event": ev, "socket": sock}
    assert seen[:2] == [
        {**common, "subscriber": 0, "subscriber_socket": s1.socket, "old_state": "healthy",
         "new_state": "failing", "reason": "failure", "held": 0},
        {**common, "subscriber": -1, "subscriber_socket": "", "old_state": "empty",
         "new_state": "holding", "reason": "holding", "held": 1}], seen
    dropped = seen[2]
    assert dropped["reason"].startswith("dropped 3 held events (3 queue full) in "), dropped
    assert dropped == {**common, "subscriber": -1, "subscriber_socket": "",
                       "old_state": "holding", "new_state": "holding",
                       "reason": dropped["reason"], "held": 2}, dropped
    s1.bind()
    s1.wait_count(2, ev)
    seen = changes(status, 5, "recovery and drained")
    assert [(c["reason"], c["old_state"], c["new_state"], c["subscriber"]) for c in seen[3:]] == [
        ("recovery", "failing", "healthy", 0), ("drained", "holding", "empty", -1)], seen
    assert (seen[4]["event"], seen[4]["socket"], seen[4]["held"]) == (ev, sock, 0), seen


def test_a_parallel_subscribers_queue_is_that_subscriber(make_srv, recv):
    srv = make_srv(failover_timeout=0, virtual_params={"spool_retry_interval": 50})
    status, live, dead = recv.udp(), recv.udp(), recv.dead()
    srv.subscribe(STATUS, status.socket)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL SPOOL(10)", live, dead))
    # one event: two raised over MI may run in two workers at once, and
    # the second be held before the first's change reads the queue's count
    srv.raise_event(ev, {"seq": 0})
    live.wait_count(1, ev)
    # the failed event is held for the subscriber before its failure is
    # counted (the log lines come in that order too)
    seen = changes(status, 2, "holding and failure")
    assert [(c["reason"], c["subscriber"], c["subscriber_socket"], c["held"]) for c in seen] == [
        ("holding", 1, dead.socket, 1), ("failure", 1, dead.socket, 1)], seen


def test_a_hash_key_missing_is_said_once(make_srv, recv):
    srv, status = make_srv(), recv.udp()
    srv.subscribe(STATUS, status.socket)
    subs = recv.udp(2)
    ev = srv.new_event()
    sock = virtual("HASH(callid)", *subs)
    srv.subscribe(ev, sock)
    for i in range(4):
        raise_one(srv, ev, i, subs)
    [c] = changes(status, 1, "the unkeyed status event")
    assert c == {"event": ev, "socket": sock, "subscriber": -1, "subscriber_socket": "",
                 "old_state": "keyed", "new_state": "unkeyed", "reason": "unkeyed",
                 "held": 0}, c


def test_a_virtual_subscription_to_the_status_event_terminates(make_srv, recv):
    srv = make_srv(failover_timeout=0, virtual_params={"spool_retry_interval": 50})
    status = recv.udp()
    srv.subscribe(STATUS, status.socket)
    srv.subscribe(STATUS, virtual("FAILOVER SPOOL(1)", recv.dead(), recv.dead()))
    srv.subscribe(STATUS, virtual("PARALLEL", recv.dead()))
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", recv.dead(), recv.dead()))
    for i in range(3):
        srv.raise_event(ev, {"seq": i})
    # ev's subscribers failed, once each; nothing about the status
    # subscriptions, though their subscribers failed and their spool held
    # and dropped: the drop episode is said after 5 s of quiet, so the
    # window covers it
    wait_until(lambda: status.count(STATUS) >= 2, 10, "the failures' status events")
    assert_quiet([status], [2], STATUS, window=7)
    got = [e["params"] for e in status.events(STATUS)]
    assert sorted((c["event"], c["subscriber"], c["reason"]) for c in got) == [
        (ev, 0, "failure"), (ev, 1, "failure")], got
    srv.assert_alive("after the status event's own subscribers failed")
    st = srv.statistics("event_virtual")
    assert st["events_spooled"] == 2 and st["events_dropped"] == 1, st
    assert "dropped 1 held event (1 queue full)" in srv.log.text()


def guide_event_route():
    """The guide's event_route example (section 7.1), as written there."""
    guide = (Path(__file__).resolve().parents[2] / "doc" / "event_virtual.md").read_text()
    [example] = [b for b in guide.split("```")[1::2]
                 if b.lstrip().startswith("event_route[E_EVENT_VIRTUAL_STATUS]")]
    return example


def test_the_guides_event_route_logs_a_subscriber_going_down(make_srv, recv, monkeypatch):
    """The guide's example, as written; on 3.4 event_route is a module of
    its own, which the guide says to load."""
    script, example = OpenSips.script, guide_event_route()
    monkeypatch.setattr(OpenSips, "script", lambda self: script(self) + example)
    module = (OPENSIPS_SRC / "modules" / "event_route").is_dir()
    srv = make_srv(extra_modules={"event_route": {}} if module else ())
    dead, live = recv.dead(), recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", dead, live))
    mark = srv.log.mark()
    for i in range(3):
        raise_one(srv, ev, i, [dead, live])
    line = f"{dead.socket} of {virtual('FAILOVER', dead, live)} is down (failure, 0 held)"
    wait_until(lambda: any(line in l for l in srv.log.lines_since(mark)), 10,
               "the event_route's line")
    deadline = time.monotonic() + QUIET
    while time.monotonic() < deadline:
        assert sum(line in l for l in srv.log.lines_since(mark)) == 1
        time.sleep(0.05)
