"""Asynchronous transports: event_rabbitmq against a real RabbitMQ broker
(started for the session on free loopback ports). event_rabbitmq publishes
from its own process and reports the outcome through an IPC job
(EVI_ASYNC_STATUS); an unreachable broker (a closed port) is a failure
reported later, which the virtual socket must act on."""

import uuid

import pytest

from evvharness import closed_tcp_port, virtual, wait_until

pytestmark = pytest.mark.server(extra_modules={"event_rabbitmq": {"connect_timeout": 500}})

N = 20


def _queue(broker):
    return broker.declare(f"evv-{uuid.uuid4().hex[:12]}")


def _seqs(messages, event):
    return sorted(m["params"]["seq"] for m in messages if m.get("method") == event)


def _wait_queue(broker, queue, n, timeout=10):
    wait_until(lambda: broker.queue_count(queue) >= n, timeout,
               f"{n} messages in queue {queue} (got {broker.queue_count(queue)})",
               interval=0.05)


def test_failover_from_unreachable_broker_delivers_every_event(srv, recv, rabbitmq_broker):
    """FAILOVER [dead broker, live broker, backup UDP]: exactly N messages,
    each event once, in the live broker's queue; the backup gets nothing."""
    broker = rabbitmq_broker
    q = _queue(broker)
    dead = broker.socket(q, port=closed_tcp_port())
    backup = recv.udp()
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", dead, broker.socket(q), backup))
    for i in range(N):  # back to back: several in flight at once
        srv.raise_event(ev, {"seq": i})
    _wait_queue(broker, q, N)
    msgs = broker.drain(q)
    assert _seqs(msgs, ev) == list(range(N)), (
        f"queue got {len(msgs)} messages, seqs {_seqs(msgs, ev)}; log {srv.log.path}")
    assert backup.count(ev) == 0, f"backup got {backup.count(ev)} events"
    [entry] = srv.virtual_list(ev)
    d, live = entry["Subscribers"][0], entry["Subscribers"][1]
    assert d["state"] in ("skipped", "failing") and d["failures"] >= 1 \
        and d["failures"] == d["attempts"], f"dead broker shown as {d}"
    assert live["state"] == "healthy" and live["attempts"] == N and live["failures"] == 0, live
    # nothing more arrives (a late duplicate would show up here)
    assert broker.queue_count(q) == 0 and backup.count(ev) == 0


def test_round_robin_around_unreachable_broker_loses_none(srv, rabbitmq_broker):
    """ROUND-ROBIN [live broker queue A, dead broker, live broker queue B]
    (two subscriber entries on the live broker, each with its own queue and
    its own AMQP connection, and one on a closed port): N events raised,
    N messages in A and B together, each event once."""
    broker = rabbitmq_broker
    qa, qb = _queue(broker), _queue(broker)
    dead = broker.socket("nowhere", port=closed_tcp_port())
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", broker.socket(qa), dead, broker.socket(qb)))
    before = srv.virtual_stats()
    for i in range(N):
        srv.raise_event(ev, {"seq": i})
    wait_until(lambda: broker.queue_count(qa) + broker.queue_count(qb) >= N, 10,
               f"{N} messages in queues A and B "
               f"(got {broker.queue_count(qa)} + {broker.queue_count(qb)})", interval=0.05)
    after = wait_until(
        lambda: (lambda s: s if s["events_delivered"] + s["events_failed"]
                 - before["events_delivered"] - before["events_failed"] >= N else None)(
            srv.virtual_stats()), what="the chains to end (statistics)")
    a, b = broker.drain(qa), broker.drain(qb)
    got = _seqs(a, ev) + _seqs(b, ev)
    assert sorted(got) == list(range(N)), (
        f"A got {_seqs(a, ev)}, B got {_seqs(b, ev)}: lost or duplicated; log {srv.log.path}")
    assert after["events_failed"] == before["events_failed"], (before, after)
    assert after["failovers"] > before["failovers"], "the dead broker was never tried"
    [entry] = srv.virtual_list(ev)
    d = entry["Subscribers"][1]
    assert d["failures"] >= 1 and d["failures"] == d["attempts"], f"dead broker shown as {d}"


def test_parallel_with_unreachable_broker_delivers_to_the_live_one(srv, rabbitmq_broker):
    """PARALLEL does not wait: the live broker gets every event once, and
    the dead one's asynchronous failures show in its counters."""
    broker = rabbitmq_broker
    q = _queue(broker)
    dead = broker.socket(q, port=closed_tcp_port())
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", dead, broker.socket(q)))
    n = 5
    for i in range(n):
        srv.raise_event(ev, {"seq": i})
    _wait_queue(broker, q, n)
    assert _seqs(broker.drain(q), ev) == list(range(n))
    wait_until(lambda: srv.virtual_list(ev)[0]["Subscribers"][0]["failures"] == n, 5,
               "the dead broker's asynchronous failures to be counted")
