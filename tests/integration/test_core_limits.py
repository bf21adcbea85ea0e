"""OpenSIPS core bugs this module cannot mend, shown for what they are.

OpenSIPS 3.4 (evi_remove_expired_subs, which MI subscribers_list runs before
it lists an event) never moves `prev` past a subscriber it keeps. Removing
an expired subscriber that is not the first of the event's list then makes
the list start after it: every live subscriber listed before it is cut out,
no longer listed, no longer raised, never freed. 3.6 fixed it. The core adds
a new subscriber at the head of the list, so a live subscription made after
one that then expires is the one lost. Direct subscriptions suffer it as
much as virtual ones; on 3.4 these tests are expected failures (strict: a
3.4 that passes them shows the bug is gone).
"""

import re
import time

import pytest

from evvharness import raise_one, virtual


def _core_version(srv):
    text = srv.mi("version")["Server"]
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    assert m, text
    return tuple(int(x) for x in m.groups())


@pytest.mark.parametrize("kind", ["direct", "virtual"])
def test_listing_removes_an_expired_subscriber_and_keeps_the_live_ones(srv, recv, kind, request):
    if _core_version(srv) < (3, 6):
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "OpenSIPS 3.4 core bug: evi_remove_expired_subs cuts the live subscribers "
            "listed before an expired one out of the event's list")))
    ev = srv.new_event()
    old, live = recv.udp(), recv.udp()

    def sock(r):
        return r.socket if kind == "direct" else virtual("FAILOVER", r)

    srv.subscribe(ev, sock(old), expire=1)
    srv.subscribe(ev, sock(live), expire=3600)      # now first in the list
    # the core counts whole seconds: `old` has expired once now > its time + 1
    time.sleep(2.1)
    assert srv.subscribers(ev) == [sock(live)], "the live subscription left the list"
    assert raise_one(srv, ev, 0, [old, live]) == [1], "the live subscription got no event"
