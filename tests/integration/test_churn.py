"""Reliability: subscription churn while worker processes raise without pause.

One event per policy (FAILOVER, ROUND-ROBIN, PARALLEL). Each has
  * a direct UDP subscriber, the *sentinel*: it gets every raise of its
    event exactly once, so the test knows how many raises happened;
  * a permanent virtual subscription with receivers of its own;
  * churned virtual subscriptions built from a shared pool of healthy
    receivers (UDP, unix datagram, flatstore), subscribed, refreshed,
    unsubscribed (expire 0) and left to expire (expire 1-2 s), well over a
    thousand operations in all,
while a background thread keeps SIP requests with X-Count bursts flowing, so
that both SIP workers raise the three events during the whole churn (flow
control on the sentinels keeps the backlog small).

At the end: the server is up and logged no crash, exactly the subscriptions
the test left are listed (subscribers_list and event_virtual_list), every
raise is accounted for (sentinels, permanent receivers, module statistics
against the datagrams and lines the receivers got), and once the churned
subscriptions are gone shmem:used_size is back within a byte per operation.

Subscriptions are listed only after a *sweep*: one raise of each event,
whose loop in the core removes what has expired or been unsubscribed. The
core's other removal walk, the one MI subscribers_list runs, cuts live
subscriptions out of the list on OpenSIPS 3.4 (test_core_limits.py shows
it); the raise loop removes them correctly on every supported version, so
the listing checks here hold on all of them.

Every subscriber is healthy and synchronous, so every event is delivered:
FAILOVER and ROUND-ROBIN to exactly one subscriber, PARALLEL to both of its
two subscribers (every PARALLEL socket here has exactly two).
"""

import random
import re
import time
from collections import Counter

from evvharness import (Raiser, crash_lines, identity, stats_delta, sweep, tag_of,
                        wait_shm_back, wait_until, wait_while_moving)

SEED = 20240611
OPS = 1200                 # subscribe / refresh / unsubscribe / expire operations
BURST = 25                 # raises per SIP request (X-Count)
MAX_OUTSTANDING = 4 * BURST
SHM_PER_OP = 1             # bytes of shared memory left per operation, at most
POLICIES = ("FAILOVER", "ROUND-ROBIN", "PARALLEL")
CHURN_TAG = "churn"
WARM = 5                   # warm-up raises per event
CHECKPOINT = 40            # operations between two checks that raises go on
# The operations are spread over this long at least, so that subscriptions
# given 1-2 s expire while the raises go on: a churn done in a second
# would see most of them expire after it.
CHURN_SECONDS = 4.0


# ---- helpers ---------------------------------------------------------------

def assert_raises_once(receivers, event, raised, who):
    """`receivers` (one, or several together) got each raise in `raised`
    (a Counter of (tag, i)) exactly once, and no other churn raise."""
    if not isinstance(receivers, list):
        receivers = [receivers]
    got = Counter(identity(e) for r in receivers for e in r.events(event)
                  if str(tag_of(e)).startswith(CHURN_TAG + "/"))
    lost = sorted(set(raised) - set(got))
    twice = sorted(k for k, n in got.items() if n > 1)
    extra = sorted(set(got) - set(raised))
    assert not lost and not twice and not extra, (
        f"{who} ({event}): lost {lost[:10]} ({len(lost)}), twice {twice[:10]} ({len(twice)}), "
        f"never raised {extra[:10]}")


def _count(receiver, event, tag=CHURN_TAG):
    return receiver.tag_count(event, tag)


def _canon(sock):
    """A virtual socket as the set key the module matches on."""
    assert sock.startswith("virtual:"), sock
    policy, *subs = sock[len("virtual:"):].split()
    return (policy, tuple(sorted(subs)) if policy == "PARALLEL" else tuple(subs))


def _text(key):
    policy, subs = key
    return "virtual:" + policy + " " + " ".join(subs)


# ---- the test --------------------------------------------------------------

def test_churn_while_workers_raise(own_srv, recv):
    srv = own_srv
    rnd = random.Random(SEED)
    events = {p: srv.new_event() for p in POLICIES}
    evlist = [events[p] for p in POLICIES]

    # sentinels and permanent subscriptions
    sentinels = {}
    for ev in evlist:
        sentinels[ev] = recv.udp()
        srv.subscribe(ev, sentinels[ev].socket)
    perm_fo = recv.udp(2)
    perm_rr = recv.udp(3)
    # event_flatstore frees the wrong socket when one that is not the newest
    # of its list goes (OpenSIPS 3.6.8 and 4.0.1, flat_free: `it->next =
    # it->next->next; shm_free(it->next);`), and crashes on a later raise,
    # with or without event_virtual. So flatstore is a subscriber of a
    # permanent subscription (its socket lives to the end; refreshes parse
    # and free a newest one, which is safe) and not of the churned ones.
    flat = recv.flatstore()
    perm_par = [recv.udp(), flat]
    perm = {
        "FAILOVER": (perm_fo, "virtual:FAILOVER " + " ".join(r.socket for r in perm_fo)),
        "ROUND-ROBIN": (perm_rr, "virtual:ROUND-ROBIN " + " ".join(r.socket for r in perm_rr)),
        "PARALLEL": (perm_par, "virtual:PARALLEL " + " ".join(r.socket for r in perm_par)),
    }
    for p, (_, sock) in perm.items():
        srv.subscribe(events[p], sock)

    # the pool the churned subscriptions are made of. A unix datagram
    # receiver's queue is short (net.unix.max_dgram_qlen), so under this load
    # event_datagram's send to it may fail (EAGAIN): the only subscriber
    # allowed to fail; the UDP ones have deep buffers and never do.
    unix = recv.unix()
    pool = recv.udp(4) + [unix]
    tokens = [r.socket for r in pool]

    def random_key(policy):
        if policy == "PARALLEL":
            subs = rnd.choices(tokens, k=2)        # duplicates allowed
            return (policy, tuple(sorted(subs)))
        return (policy, tuple(rnd.choices(tokens, k=rnd.randint(1, 3))))

    def text_for(key):
        policy, subs = key
        if policy == "PARALLEL":                   # any order is the same one
            subs = list(subs)
            rnd.shuffle(subs)
        return "virtual:" + policy + " " + " ".join(subs)

    # warm up every transport once (lazy allocations, flatstore's file), then
    # take the baselines with nothing churned subscribed
    warm = [(p, (p, tuple(sorted(tokens[:2])) if p == "PARALLEL" else tuple(tokens)))
            for p in POLICIES]
    perm_keys = {p: _canon(perm[p][1]) for p in POLICIES}
    for p, key in warm:
        srv.subscribe(events[p], _text(key))
    for ev in evlist:
        srv.send_sip(ev, count=WARM, tag="warm")
    for ev in evlist:
        wait_until(lambda: _count(sentinels[ev], ev, "warm") == WARM, 10, f"warm-up raises of {ev}")
    for p, key in warm:
        srv.unsubscribe(events[p], _text(key))
    wait_until(lambda: all(len(srv.subscribers(ev)) == 2 for ev in evlist), 5,
               "the warm-up subscriptions to go", interval=0.05)
    baseline_subs = {ev: sorted(srv.subscribers(ev)) for ev in evlist}
    shm0 = srv.shm_used()
    stats0 = srv.virtual_stats()
    mark = srv.log.mark()

    # ---- churn while the workers raise -----------------------------------
    # every burst a tag of its own (CHURN_TAG/n): each raise is known by
    # (tag, i), and counted one by one at every receiver
    raiser = Raiser(srv, sentinels, BURST, MAX_OUTSTANDING, CHURN_TAG, unique=True)
    model = {}                  # key -> expire of its last subscribe
    live = {p: set() for p in POLICIES}    # keys whose last op had a long expire
    ops = Counter()
    history = {}                # (event, key) -> [(time, op, expire, text)]
    raiser.start()
    t_start = time.monotonic()
    try:
        for n in range(OPS):
            if raiser.error:
                break
            time.sleep(max(0.0, t_start + n * CHURN_SECONDS / OPS - time.monotonic()))
            if n % CHECKPOINT == 0:
                # the workers keep raising all along the churn
                raiser.wait_burst(f"raises to go on during the churn (op {n})")
            p = POLICIES[n % 3]
            ev = events[p]
            nlive = len(live[p])
            # PARALLEL has 15 two-subscriber multisets of 5 tokens: stay below
            cap = 10 if p == "PARALLEL" else 30
            r = rnd.random()
            if nlive < 6 or (nlive < cap and r < 0.3):
                op = "subscribe"
            elif r < 0.55:
                op = "refresh"
            elif r < 0.8 or nlive >= cap:
                op = "unsubscribe"
            else:
                op = "expire"
            if op == "subscribe":
                for _ in range(1000):
                    key = random_key(p)
                    if key not in live[p]:
                        break
                else:
                    raise AssertionError("harness: no free subscriber combination")
                expire = rnd.choice((600, 3600))
            elif op == "refresh":
                # sometimes the permanent one (flatstore is in its PARALLEL)
                key = perm_keys[p] if rnd.random() < 0.25 else rnd.choice(sorted(live[p]))
                expire = rnd.choice((600, 3600, 7200))
            elif op == "unsubscribe":
                key = rnd.choice(sorted(live[p]))
                expire = 0
            else:
                # a live one shortened, or a new one, left to expire by itself
                key = rnd.choice(sorted(live[p])) if rnd.random() < 0.5 else random_key(p)
                expire = rnd.choice((1, 2))
            text = text_for(key)
            srv.subscribe(ev, text, expire=expire)
            history.setdefault((ev, key), []).append(
                (round(time.time(), 3), op, expire, text))
            ops[op] += 1
            if key == perm_keys[p]:
                continue
            model[(ev, key)] = expire
            if expire > 2:
                live[p].add(key)
            else:
                live[p].discard(key)

        t_churn = time.monotonic() - t_start
    finally:
        raiser.stop_flag.set()
        raiser.join(30)
    assert raiser.error is None, f"raising thread: {raiser.error!r}"
    assert sum(ops.values()) == OPS, ops
    assert all(ops[o] >= 100 for o in ("subscribe", "refresh", "unsubscribe", "expire")), ops

    sent = dict(raiser.sent)
    srv.assert_alive("after the churn")

    # ---- every raise happened, in both workers ---------------------------
    # Receivers drain what the load left in their buffers at their own pace:
    # the waits below last as long as their counts move.
    for ev in evlist:
        wait_while_moving(lambda: _count(sentinels[ev], ev) >= sent[ev],
                          lambda: _count(sentinels[ev], ev),
                          f"{sent[ev]} raises of {ev} at its sentinel (got {_count(sentinels[ev], ev)})")
    raised = {ev: raiser.raised(ev) for ev in evlist}
    for ev in evlist:
        assert sum(raised[ev].values()) == sent[ev], "harness: a burst counted twice"
        assert _count(sentinels[ev], ev) == sent[ev], "a direct subscriber got a raise twice"
        assert_raises_once(sentinels[ev], ev, raised[ev], "the sentinel")
    pids = {e["params"]["pid"] for ev in evlist for e in sentinels[ev].events(ev)
            if str(tag_of(e)).startswith(CHURN_TAG + "/")}
    assert len(pids) >= 2, f"harness: all raises ran in one worker process {pids}"
    total_raises = sum(sent.values())
    assert total_raises >= 3 * BURST * 5, f"harness: only {total_raises} raises during the churn"

    # ---- the permanent subscriptions got every raise -----------------------
    def perm_counts():
        return {p: [_count(r, events[p]) for r in perm[p][0]] for p in POLICIES}

    def perm_done():
        c = perm_counts()
        return (sum(c["FAILOVER"]) >= sent[events["FAILOVER"]]
                and sum(c["ROUND-ROBIN"]) >= sent[events["ROUND-ROBIN"]]
                and min(c["PARALLEL"]) >= sent[events["PARALLEL"]])
    wait_while_moving(perm_done, perm_counts,
                      f"permanent subscriptions to get every raise {perm_counts()}")
    c = perm_counts()
    assert c["FAILOVER"] == [sent[events["FAILOVER"]], 0], c
    assert sum(c["ROUND-ROBIN"]) == sent[events["ROUND-ROBIN"]], c
    assert max(c["ROUND-ROBIN"]) - min(c["ROUND-ROBIN"]) <= 1, (
        f"ROUND-ROBIN with three healthy subscribers does not share evenly: {c}")
    assert c["PARALLEL"] == [sent[events["PARALLEL"]]] * 2, c
    # raise by raise: FAILOVER's first subscriber and the ROUND-ROBIN three
    # together got each raise once, each PARALLEL subscriber got each once
    ev = events["FAILOVER"]
    assert_raises_once(perm_fo[0], ev, raised[ev], "the permanent FAILOVER's first")
    ev = events["ROUND-ROBIN"]
    assert_raises_once(perm_rr, ev, raised[ev], "the permanent ROUND-ROBIN")
    ev = events["PARALLEL"]
    for r in perm_par:
        assert_raises_once(r, ev, raised[ev], f"the permanent PARALLEL's {r}")

    # ---- statistics against what the receivers got -------------------------
    everyone = list(pool) + perm_fo + perm_rr + perm_par

    def copies():
        """What the receivers got: copies of FAILOVER and ROUND-ROBIN
        events, copies of PARALLEL events."""
        fo_rr = sum(_count(r, events[p]) for r in everyone for p in ("FAILOVER", "ROUND-ROBIN"))
        par = sum(_count(r, events["PARALLEL"]) for r in everyone)
        return fo_rr, par

    # Every PARALLEL socket has two subscribers: an event delivered (to both)
    # made two copies, an incomplete one one copy, a failed one none. A
    # FAILOVER / ROUND-ROBIN event delivered made one copy, a failed one none:
    #   delivered == fo_rr + (par - incomplete) / 2
    def settled():
        d = stats_delta(stats0, srv.virtual_stats())
        fo_rr, par = copies()
        if d["events"] == d["events_delivered"] + d["events_failed"] + d["events_incomplete"] \
                and 2 * d["events_delivered"] == 2 * fo_rr + par - d["events_incomplete"]:
            return d
        return None
    try:
        d = wait_while_moving(settled, lambda: (copies(), srv.virtual_stats()),
                              "statistics and receivers to agree")
    except AssertionError:
        d = stats_delta(stats0, srv.virtual_stats())
        drops = sum(r.kernel_drops() for r in everyone if hasattr(r, "kernel_drops"))
        raise AssertionError(f"statistics delta {d} vs deliveries (FAILOVER+ROUND-ROBIN, "
                             f"PARALLEL copies) {copies()}; datagrams the kernel dropped at "
                             f"full UDP receive buffers: {drops}")
    fo_rr, par = copies()
    # at the churned receivers: copies of raises that were made only
    for p in POLICIES:
        ev = events[p]
        got = {identity(e) for r in pool for e in r.events(ev)
               if str(tag_of(e)).startswith(CHURN_TAG + "/")}
        assert not got - set(raised[ev]), (
            f"{p}: copies of raises never made: {sorted(got - set(raised[ev]))[:10]}")
    assert d["events"] == d["events_delivered"] + d["events_failed"] + d["events_incomplete"], d
    assert 2 * d["events_delivered"] == 2 * fo_rr + par - d["events_incomplete"], (d, fo_rr, par)
    # only the unix subscriber can fail, and it is in a minority of events
    assert d["events_delivered"] > 0.5 * d["events"], d
    # each raise reached at least the permanent virtual subscription of its event
    assert d["events"] >= total_raises, (d, sent)

    # ---- exactly the expected subscriptions remain -------------------------
    last_op = max(h[-1][0] for h in history.values())
    sweep(srv, sentinels, last_op, 2)
    sweeps = 1
    expected = {ev: {key for (e, key), exp in model.items() if e == ev and exp > 2}
                for ev in evlist}
    for p in POLICIES:
        assert expected[events[p]] == live[p]

    # OpenSIPS core race (3.6.8 and 4.0.1, evi_raise_event_msg): a raiser
    # saves the socket's flags, sets EVI_PENDING, raises without the lock and
    # restores the saved flags. When two processes raise the same event at
    # once, the second saves flags that hold the first one's EVI_PENDING and
    # puts it back after the first has cleared it: the socket stays PENDING,
    # which the core never expires ("ttl": "expired" in subscribers_list, and
    # still raised). Any subscriber, virtual or not, can be caught. Such a
    # leftover must be one the test unsubscribed or let expire, listed as
    # expired; a new unsubscribe resets its flags, and then it goes.
    def listing_state():
        missing, extra, stuck = {}, {}, {}
        for p in POLICIES:
            ev = events[p]
            want = Counter(expected[ev] | {perm_keys[p]})
            got, expired = Counter(), Counter()
            for s in srv.subscribers_list(ev)["Event"]["Subscribers"]:
                if s["socket"].startswith("virtual:"):
                    got[_canon(s["socket"])] += 1
                    if s.get("ttl") == "expired":
                        expired[_canon(s["socket"])] += 1
            missing[p] = list((want - got).elements())
            over = got - want
            stuck[p] = list((over & expired).elements())
            extra[p] = list((over - expired).elements())
        return missing, extra, stuck

    def listing_ok():
        missing, extra, stuck = listing_state()
        if any(missing.values()) or any(extra.values()):
            return None
        return stuck
    try:
        stuck = wait_until(listing_ok, 6, "subscribers_list to show the expected subscriptions",
                           interval=0.1)
    except AssertionError:
        missing, extra, stuck = listing_state()
        hist = {f"{p}:{k}": history.get((events[p], k))
                for p in POLICIES for k in missing[p] + extra[p]}
        raise AssertionError(
            f"subscribers_list differs from the subscriptions left: missing {missing}, "
            f"extra {extra}\nnow {time.time():.3f}; operations on them: {hist}")
    n_stuck = sum(len(v) for v in stuck.values())
    for p in POLICIES:
        for key in stuck[p]:
            assert model.get((events[p], key), 0) <= 2, (key, history.get((events[p], key)))
            srv.unsubscribe(events[p], _text(key))
    sweep(srv, sentinels, time.time())
    sweeps += 1

    def virtual_listed(ev):
        return Counter(_canon(s) for s in srv.subscribers(ev) if s.startswith("virtual:"))

    def listing_matches():
        return all(virtual_listed(events[p]) == Counter(expected[events[p]] | {perm_keys[p]})
                   for p in POLICIES)
    wait_until(listing_matches, 5, f"the {n_stuck} subscription(s) stuck by the core's "
               f"EVI_PENDING race to go once unsubscribed again: {stuck}", interval=0.1)
    for ev in evlist:
        direct = [s for s in srv.subscribers(ev) if not s.startswith("virtual:")]
        assert direct == [sentinels[ev].socket], direct

    vl = srv.virtual_list()
    got = Counter((s["event"], _canon(s["socket"])) for s in vl if s["event"] in evlist)
    want = Counter({(events[p], _canon(perm[p][1])) for p in POLICIES}
                   | {(ev, key) for ev in evlist for key in expected[ev]})
    assert got == want, {"missing": list((want - got).elements()),
                         "extra": list((got - want).elements())}
    for s in vl:
        assert s["policy"] == _canon(s["socket"])[0]
        assert [x["socket"] for x in s["Subscribers"]] == s["socket"].split()[1:]
        assert all(x["state"] == "healthy" and x["failures"] == 0
                   for x in s["Subscribers"] if x["socket"] != unix.socket), s
    for p in POLICIES:
        one = [s for s in srv.virtual_list(events[p])
               if _canon(s["socket"]) == _canon(perm[p][1])]
        assert len(one) == 1
        attempts = [x["attempts"] for x in one[0]["Subscribers"]]
        warm_n = WARM + sweeps  # the warm-up and sweep raises reached them too
        if p == "FAILOVER":
            assert attempts == [sent[events[p]] + warm_n, 0], attempts
        elif p == "PARALLEL":
            assert attempts == [sent[events[p]] + warm_n] * 2, attempts
        else:
            assert sum(attempts) == sent[events[p]] + warm_n, attempts

    # ---- all churned subscriptions gone: shared memory back ----------------
    for ev in evlist:
        for key in expected[ev]:
            srv.unsubscribe(ev, _text(key))
    sweep(srv, sentinels, time.time())
    wait_until(lambda: all(sorted(srv.subscribers(ev)) == baseline_subs[ev] for ev in evlist),
               5, "the last churned subscriptions to go", interval=0.1)

    subscribes = ops["subscribe"] + ops["refresh"] + ops["expire"]
    # 16 bytes stay after this churn (OpenSIPS 4.0.1; one allocation, the
    # same however many operations): SHM_PER_OP bounds that, while a leak
    # of one allocation (16 bytes at least) in one operation in 16 fails
    wait_shm_back(srv, shm0, OPS, SHM_PER_OP, f"after {subscribes} subscribes")

    # ---- the server survived ------------------------------------------------
    srv.assert_alive("at the end of the churn")
    bad = crash_lines("\n".join(srv.log.lines_since(mark)))
    bad += [l for l in srv.log.lines_since(mark) if "segfault" in l.lower()]
    assert not bad, "\n".join(bad)
    # the only ERROR event_virtual may log: an event lost (every subscriber,
    # i.e. the unix one, failed it); and health changes only for unix
    lost = re.compile(r"ERROR:event_virtual:.*event '(E_T\d+)' was not delivered by")
    errs = srv.log.errors_since(mark, module="event_virtual")
    assert all(lost.search(l) for l in errs), "\n".join(errs[:10])
    failed = srv.virtual_stats()["events_failed"] - stats0["events_failed"]  # sweeps included
    assert len(errs) <= failed, (len(errs), failed)
    warns = [l for l in srv.log.lines_since(mark) if "WARNING:event_virtual" in l]
    assert all(f"subscriber '{unix.socket}' of" in l for l in warns), "\n".join(warns[:10])
    print(f"churn: {dict(ops)} in {t_churn:.1f}s; raises {sent}; stats delta {d}; "
          f"stuck PENDING (core race) {n_stuck}; "
          f"shm {shm0} -> {srv.shm_used()}")
