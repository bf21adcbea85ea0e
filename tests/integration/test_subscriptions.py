"""Print, match, refresh, unsubscribe and expiry of virtual subscriptions."""

import itertools
import math
import time

import pytest

from evvharness import assert_quiet, raise_one, virtual, wait_until


@pytest.mark.parametrize("policy", ["PARALLEL", "FAILOVER", "ROUND-ROBIN"])
def test_print_uses_single_spaces(srv, recv, policy):
    a, b = recv.udp(2)
    ev = srv.new_event()
    srv.subscribe(ev, f"virtual: \t{policy}\t \t{a.socket}   \t\t{b.socket} \t ")
    assert srv.subscribers(ev) == [f"virtual:{policy} {a.socket} {b.socket}"]


# (policy, first subscriber list, second list, same subscription?)
MATCH_CASES = [
    ("PARALLEL", "ab", "ab", True),
    ("PARALLEL", "ab", "ba", True),
    ("PARALLEL", "aab", "aba", True),
    ("FAILOVER", "ab", "ab", True),
    ("ROUND-ROBIN", "ab", "ab", True),
    ("FAILOVER", "ab", "ba", False),
    ("ROUND-ROBIN", "ab", "ba", False),
    ("PARALLEL", "aab", "abb", False),   # a multiset: duplicates count
    ("PARALLEL", "ab", "aba", False),
    ("PARALLEL", "ab", "a", False),
]


@pytest.mark.parametrize("policy,first,second,same", MATCH_CASES,
                         ids=[f"{p}-{f}-{s}" for p, f, s, _ in MATCH_CASES])
def test_match(srv, recv, policy, first, second, same):
    rx = dict(zip("ab", recv.udp(2)))
    ev = srv.new_event()
    s1 = virtual(policy, *(rx[c] for c in first))
    s2 = virtual(policy, *(rx[c] for c in second))
    srv.subscribe(ev, s1)
    srv.subscribe(ev, s2)
    listed = srv.subscribers(ev)
    if same:
        assert listed == [s1], "a matching subscribe must refresh, not add"
    else:
        assert sorted(listed) == sorted([s1, s2]), "different sockets must not match"


def test_subscribing_twice_delivers_once(srv, recv):
    a, b = recv.udp(2)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("PARALLEL", a, b))
    srv.subscribe(ev, f"virtual:PARALLEL  {b.socket}\t{a.socket}")
    raise_one(srv, ev, 0, [a, b], copies=2)
    assert_quiet([a, b], [1, 1], ev)


def test_refresh_releases_the_new_socket(srv, recv):
    """A matching subscribe refreshes the old subscription; the socket parsed
    for it (with its UDP sub-sockets) is freed, every time."""
    a, b = recv.udp(2)
    ev = srv.new_event()
    sock = virtual("ROUND-ROBIN", a, b)
    srv.subscribe(ev, sock)
    srv.subscribe(ev, sock)
    baseline = srv.shm_used()
    for _ in range(5):
        srv.subscribe(ev, sock)
    assert srv.shm_used() == baseline, "refreshing a subscription leaks shared memory"
    assert srv.subscribers(ev) == [sock]
    assert raise_one(srv, ev, 0, [a, b]) == [0]


def test_failover_in_other_order_is_another_subscription(srv, recv):
    a, b = recv.udp(2)
    ev = srv.new_event()
    srv.subscribe(ev, virtual("FAILOVER", a, b))
    srv.subscribe(ev, virtual("FAILOVER", b, a))
    raise_one(srv, ev, 0, [a, b], copies=2)
    assert_quiet([a, b], [1, 1], ev)


# time(0) in OpenSIPS reads the coarse clock, which lags time.time() by up
# to a tick: compare against the same clock.
_CORE_CLOCK = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # 5 on Linux


def _core_time():
    return time.clock_gettime(_CORE_CLOCK)


def _second_has_passed(since, seconds):
    """True once the core's time(0) is more than `seconds` past `since`
    (subscriptions expire when subscription_time + expire < now)."""
    limit = math.floor(since) + seconds + 1
    return lambda: _core_time() >= limit


@pytest.mark.parametrize("removal", ["unsubscribe", "expiry"])
def test_removed_subscription_gets_nothing_and_server_survives(own_srv, recv, removal):
    """Repeated subscribe / deliver / remove cycles with UDP sub-sockets.

    The removal is noticed alternately by an MI listing (freed in the MI
    process) and by a raise (freed in a worker)."""
    srv = own_srv
    ev = srv.new_event()
    sentinel = recv.udp()  # plain subscriber of the same event: proves raises happen
    srv.subscribe(ev, sentinel.socket)
    seq = itertools.count()
    baseline = None
    for cycle in range(3):
        a, b = recv.udp(2)
        sock = virtual("PARALLEL", a, b)
        expire = 1 if removal == "expiry" else 3600
        srv.subscribe(ev, sock, expire=expire)
        t_sub = _core_time()
        raise_one(srv, ev, next(seq), [a, b, sentinel], copies=3)

        if removal == "unsubscribe":
            srv.unsubscribe(ev, sock)
            t_sub, expire = _core_time(), 0
        noticed_by_listing = cycle % 2 == 0
        if noticed_by_listing:
            wait_until(lambda: sock not in srv.subscribers(ev), 4,
                       f"{sock} to leave subscribers_list after {removal}")
        else:
            wait_until(_second_has_passed(t_sub, expire), expire + 3,
                       "the subscription's end time")

        n = next(seq)
        srv.raise_event(ev, {"seq": n})
        wait_until(lambda: any(e["params"]["seq"] == n for e in sentinel.events(ev)), 3,
                   f"sentinel to get event {n} after {removal} (cycle {cycle})")
        assert_quiet([a, b], [1, 1], ev)
        srv.assert_alive(f"after {removal} cycle {cycle}")
        assert sock not in srv.subscribers(ev)
        if baseline is None:  # after one full cycle: first-time allocations done
            baseline = srv.shm_used()
    assert srv.shm_used() == baseline, "shared memory leaked by subscribe/remove cycles"
