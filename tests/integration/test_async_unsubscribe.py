"""Asynchronous transports: a virtual subscription unsubscribed while
event_stream answers are still pending. The pending chains keep what they
need until their answers come; the server survives and shared memory comes
back."""

import pytest

from evvharness import assert_quiet, crash_lines, seqs_of, virtual, wait_until

# long enough that no request times out while the test holds the answers
pytestmark = pytest.mark.server(stream_timeout=10000)


def chains_ended(srv, before, n):
    s = srv.virtual_stats()
    ended = (s["events_delivered"] - before["events_delivered"]
             + s["events_failed"] - before["events_failed"])
    return s if ended >= n else None


def test_unsubscribe_while_answers_are_pending(make_srv, recv):
    srv = make_srv()
    ev = srv.new_event()
    k = 6
    sentinel = recv.udp()  # plain subscriber of the same event: raises happen
    srv.subscribe(ev, sentinel.socket)
    baseline = None
    for rnd in range(3):
        holder, backup = recv.tcp("hold"), recv.udp()
        sock = virtual("FAILOVER", holder, backup)
        if rnd == 1:
            baseline = srv.shm_used()  # after one full round (warm-up)
        before = srv.virtual_stats()
        srv.subscribe(ev, sock)
        for i in range(k):
            srv.raise_event(ev, {"seq": i})
        wait_until(lambda: len(seqs_of(sentinel, ev)) == (rnd + 1) * k + rnd, 3,
                   "the sentinel to get the round's events")
        wait_until(lambda: len(holder.held()) == k, 5,
                   f"{k} requests held by the JSON-RPC server (got {len(holder.held())})")

        # unsubscribe (expire 0: gone once the core's second has passed);
        # listing the event makes the core drop the subscriber
        srv.unsubscribe(ev, sock)
        wait_until(lambda: sock not in srv.subscribers(ev), 4,
                   f"{sock} to leave subscribers_list after expire 0")
        assert srv.virtual_list(ev) == [], "event_virtual_list still lists it"
        srv.raise_event(ev, {"seq": 100 + rnd})  # reaches the sentinel only
        wait_until(lambda: 100 + rnd in seqs_of(sentinel, ev), 3, "the sentinel's event")

        # now the answers come: errors for even seqs (those chains go on to
        # the backup), success for odd ones
        # (one at a time: event_stream fails everything pending on a
        # connection when too many answers arrive in one read)
        answered = []
        for j in range(k):
            answered += holder.release(
                lambda req: "error" if req["params"]["seq"] % 2 == 0 else "ok", limit=1)
            wait_until(lambda: chains_ended(srv, before, j + 1), 5,
                       f"{j + 1} of the pending chains to end (statistics)")
        assert sorted(r["params"]["seq"] for r in answered) == list(range(k))
        srv.assert_alive(f"after answers to an unsubscribed socket (round {rnd})")
        # the events answered with an error went on to the backup, each
        # once, and nothing else did
        wait_until(lambda: len(seqs_of(backup, ev)) >= 3, 5,
                   f"the backup to get the 3 events answered with an error "
                   f"(got {seqs_of(backup, ev)})")
        assert_quiet([backup], [3], ev)
        assert sorted(seqs_of(backup, ev)) == [0, 2, 4], (
            f"backup got {seqs_of(backup, ev)}: exactly the events answered with an error "
            f"go on, once each")
        # (MI hands each raise to a worker: they may arrive in any order)
        assert sorted(seqs_of(holder, ev)) == list(range(k)), (
            f"the held server got {seqs_of(holder, ev)}: tried twice, or after unsubscribe")
    crashes = crash_lines(srv.log.text())
    assert not crashes, "\n".join(crashes)
    assert "segfault" not in srv.log.text().lower()
    wait_until(lambda: srv.shm_used() <= baseline, 5,
               f"shared memory back to {baseline} after the chains ended "
               f"(now {srv.shm_used()}): the pending chains leak")
