"""ROUND-ROBIN: the subscriber event_virtual_list names as `next` is the one
the next event reaches, also while a subscriber is passed over.

Tickets are dealt over the healthy subscribers only, so with one passed over
`rotation % n` is not where an event starts; the list must say where it does.
"""

from evvharness import raise_one, virtual

# default failover_timeout (30 s): the dead subscriber stays inside its
# window, passed over, for the whole test


def only_subscription(srv, event):
    subs = srv.virtual_list(event)
    assert len(subs) == 1, subs
    return subs[0]


def test_next_names_the_subscriber_that_gets_the_event(srv, recv):
    a, b, c = recv.udp(3)
    dead = recv.dead()  # a unix path nobody binds: its raise fails at once
    subs = [a, dead, b, c]
    ev = srv.new_event()
    srv.subscribe(ev, virtual("ROUND-ROBIN", *subs))

    # send events until the dead one has failed one and is passed over
    seq = 0
    while only_subscription(srv, ev)["Subscribers"][1]["state"] != "skipped":
        assert seq < 4, "the dead subscriber was never attempted"
        raise_one(srv, ev, seq, subs)
        seq += 1

    # 3 healthy of 4: `rotation % 4` and the healthy deal part ways within
    # a few events, and every healthy subscriber gets to be `next`
    named = []
    for seq in range(seq, seq + 12):
        s = only_subscription(srv, ev)
        assert s["Subscribers"][1]["state"] == "skipped", s
        nxt = s["next"]
        got = raise_one(srv, ev, seq, subs)
        assert got == [nxt], (
            f"event {seq}: event_virtual_list said next is subscriber {nxt}, "
            f"the event went to {got}")
        named.append(nxt)
    assert sorted(set(named)) == [0, 2, 3], named
    assert dead.count(ev) == 0
