"""What tests check about deliveries: virtual socket strings, one event
raised and followed to its receivers, absence and exactly-once checks."""

import math
import threading
import time
from collections import Counter

from .util import DEFAULT_TIMEOUT, wait_until, wait_while_moving


def virtual(policy, *subs):
    return "virtual:" + policy + " " + " ".join(
        s if isinstance(s, str) else s.socket for s in subs)


def seq_of(ev):
    p = ev.get("params")
    if isinstance(p, dict):
        return p.get("seq")
    return None


def seqs_of(receiver, event):
    return [seq_of(e) for e in receiver.events(event)]


def who_got(receivers, event, seq):
    """Indexes of receivers that got (event, seq) so far."""
    return [i for i, r in enumerate(receivers)
            if any(seq_of(e) == seq for e in r.events(event))]


def raise_one(srv, event, seq, receivers, copies=1, timeout=DEFAULT_TIMEOUT):
    """Raise event (param seq) over MI and wait until `copies` receivers in
    total got it. Returns the indexes of the receivers that got it.
    Raising one at a time keeps the order: MI hands each raise to some worker."""
    srv.raise_event(event, {"seq": seq})
    return wait_until(
        lambda: (lambda got: got if len(got) >= copies else None)(who_got(receivers, event, seq)),
        timeout, f"{event} seq={seq} to reach {copies} receiver(s) of {receivers}")


def assert_quiet(receivers, expected, event=None, window=0.3):
    """Absence check: over a short window, the counts stay as expected.
    (Loopback datagrams land in the receiver's buffer during the sender's
    sendto(), so anything still to come would be in flight already.)"""
    deadline = time.monotonic() + window
    while True:
        counts = [r.count(event) for r in receivers]
        assert counts == list(expected), (
            f"unexpected deliveries of {event}: got {counts}, expected {list(expected)}")
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def assert_each_once(receivers, event, seqs, attempts=()):
    """Every seq in seqs reached exactly one receiver of `receivers` (the
    live ones), exactly once; `attempts` (failing subscribers) saw each seq
    at most once. Returns per-live-receiver counts."""
    seen = {}
    for i, r in enumerate(receivers):
        for s in seqs_of(r, event):
            seen.setdefault(s, []).append(i)
    lost = [s for s in seqs if s not in seen]
    dup = {s: who for s, who in seen.items() if len(who) > 1}
    extra = [s for s in seen if s not in seqs]
    assert not lost and not dup and not extra, (
        f"{event}: lost {lost}, delivered more than once {dup}, unexpected {extra}; "
        f"counts {[r.count(event) for r in receivers]}")
    for r in attempts:
        got = seqs_of(r, event)
        assert len(got) == len(set(got)), f"{r} was tried twice with one event: {sorted(got)}"
    return [r.count(event) for r in receivers]


def sweep(srv, sentinels, since, expire=0):
    """Let the core remove what was unsubscribed, or subscribed at time
    `since` with `expire` and has expired, before a test lists it: one SIP
    raise of each event ({event: direct sentinel receiver}) once that has
    expired (the core counts whole seconds), seen by its sentinel.

    The raise loop removes expired subscriptions correctly on every
    supported OpenSIPS; the walk MI subscribers_list runs for that cuts
    live subscriptions out of the list on 3.4 (test_core_limits.py)."""
    time.sleep(max(0.0, math.floor(since) + expire + 1.05 - time.time()))
    before = {ev: r.count(ev) for ev, r in sentinels.items()}
    for ev in sentinels:
        srv.send_sip(ev, count=1, tag="sweep")
    for ev, r in sentinels.items():
        wait_until(lambda: r.count(ev) > before[ev], 10, f"the sweep raise of {ev}")


class Raiser(threading.Thread):
    """Keeps SIP requests with X-Count bursts (parameter tag=`tag`) going to
    the workers, over the events in turn, until stopped; never more than
    `ahead` raises ahead of what the sentinels ({event: direct receiver})
    have seen, so the workers' backlog stays small. A server that stops
    raising altogether for 20 s is an error, kept in `error`.

    unique=True gives each burst a tag of its own, `tag/n`, so that every
    raise is known by (its burst's tag, i): `raised(event)`."""

    def __init__(self, srv, sentinels, burst, ahead, tag, unique=False):
        super().__init__(daemon=True)
        self.srv, self.sentinels = srv, sentinels
        self.burst, self.ahead, self.tag = burst, ahead, tag
        self.unique = unique
        self.bursts = []        # (event, tag) of each burst sent
        self.sent = Counter()
        self.stop_flag = threading.Event()
        self.error = None

    def done(self):
        """Raises of this thread the sentinels got."""
        return sum(r.tag_count(ev, self.tag) for ev, r in self.sentinels.items())

    def raised(self, event):
        """Every raise of `event` this thread asked for, once each: a
        Counter of (tag, i) (unique=True)."""
        assert self.unique, "raises are told apart with unique=True only"
        return Counter((tag, i) for ev, tag in self.bursts if ev == event
                       for i in range(self.burst))

    def wait_burst(self, what):
        """Wait until the sentinels got one more burst of this thread's
        raises (or it failed): the workers are raising now."""
        target = self.done() + self.burst
        # as long as the sentinels' count moves: a loaded machine is slow,
        # a raise that stalls is not
        wait_while_moving(lambda: self.done() >= target or self.error, self.done, what,
                          quiet=20, interval=0.002)

    def run(self):
        try:
            events = list(self.sentinels)
            k, stall = 0, None
            while not self.stop_flag.is_set():
                if sum(self.sent.values()) - self.done() > self.ahead:
                    if stall is None:
                        stall = time.monotonic() + 20
                    elif time.monotonic() > stall:
                        raise AssertionError("raises stalled for 20 s")
                    time.sleep(0.001)
                    continue
                stall = None
                ev = events[k % len(events)]
                k += 1
                tag = f"{self.tag}/{k}" if self.unique else self.tag
                self.bursts.append((ev, tag))
                self.srv.send_sip(ev, count=self.burst, tag=tag)
                self.sent[ev] += self.burst
        except Exception as exc:  # reported by the test
            self.error = exc


def wait_shm_back(srv, before, ops=0, per_op=0, context=""):
    """Wait until shmem:used_size is back to `before` (taken once the
    warm-up's first-time allocations were made, and with what the test adds
    since all released): exactly, or within `per_op` bytes for each of `ops`
    operations when the server keeps a few bytes of its own (a bound that
    grows with the operations, not a fixed one that a leak of a few bytes
    per operation fits under). Fail with how far off it stayed."""
    slack = ops * per_op
    try:
        wait_until(lambda: 0 <= srv.shm_used() - before <= slack, 5,
                   "shmem:used_size to return", interval=0.1)
    except AssertionError:
        used = srv.shm_used()
        raise AssertionError(f"shmem:used_size {used} vs {before} before: "
                             f"{used - before:+d} bytes (allowed {slack}: {per_op} per each of "
                             f"{ops} operations) {context}") from None
