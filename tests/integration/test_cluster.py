"""Two OpenSIPS nodes in one cluster (clusterer, proto_bin) share their
subscribers' health (issue 18): what one node finds failing, the other
skips without trying it, until the first finds it back."""


import pytest

from evvharness import EVENT_POOL, OpenSips, cluster, raise_one, virtual, wait_until

A, B = 1, 2  # node ids


def sub(srv, event, i):
    """Subscriber i of the one virtual subscription of `event` on srv."""
    subs = srv.virtual_list(event)
    assert len(subs) == 1, subs
    return subs[0]["Subscribers"][i]


def cluster_stats(srv):
    s = srv.statistics("event_virtual")
    return {k: s[f"cluster_{k}"] for k in ("sent", "received", "dropped")}


def test_a_failure_one_node_finds_is_skipped_by_the_other_until_it_recovers(make_cluster,
                                                                              recv):
    # A's window is short (it retries soon), B's long: B tries the
    # subscriber again within its own window only because A said so
    a, b = make_cluster({"failover_timeout": 1}, {"failover_timeout": 60})
    dead, live = recv.dead(), recv.udp()
    subs = [dead, live]
    ev = a.new_event()
    assert b.new_event() == ev
    sock = virtual("FAILOVER", *subs)
    a.subscribe(ev, sock)
    b.subscribe(ev, sock)

    # A finds the first subscriber failing, and tells B
    assert raise_one(a, ev, 0, subs) == [1]
    wait_until(lambda: sub(b, ev, 0).get("from_node") == A, 5,
               "B to hear from A that its first subscriber fails")
    s = sub(b, ev, 0)
    assert s["state"] == "skipped" and s["attempts"] == 0, s
    assert "from_node" not in sub(a, ev, 0), "A's own finding is not from a peer"

    # back up now, but B does not try it: A said it failed
    dead.bind()
    for seq in (1, 2, 3):
        assert raise_one(b, ev, seq, subs) == [1], f"B tried the subscriber A found failing ({seq})"
    # (a worker counts an attempt just after its send: the receiver may be first)
    wait_until(lambda: sub(b, ev, 1)["attempts"] == 3, 2, "B to count its 3 attempts")
    assert sub(b, ev, 0)["attempts"] == 0

    # A tries it again after its own window, finds it back, and tells B
    seq = iter(range(10, 1000))
    wait_until(lambda: raise_one(a, ev, next(seq), subs) == [0], 10,
               "A to find its first subscriber back", interval=0.1)
    wait_until(lambda: sub(b, ev, 0)["state"] == "healthy", 5,
               "B to hear from A that its first subscriber recovered")
    assert sub(b, ev, 0)["from_node"] == A
    # within B's own 60 s window of the failure: healthy only by A's word
    assert raise_one(b, ev, 1000, subs) == [0]
    wait_until(lambda: sub(b, ev, 0)["attempts"] == 1, 2, "B to count its attempt")
    assert "from_node" not in sub(b, ev, 0), "B's own attempt makes the state its own"

    # one packet per transition, none per event
    assert cluster_stats(a)["sent"] == 2
    assert cluster_stats(b) == {"sent": 0, "received": 2, "dropped": 0}


def test_a_peer_that_is_down_changes_nothing_on_the_raise_path(make_cluster, recv):
    """B never started: A's transitions find no node to tell, and every
    event is delivered as without a cluster (latency: `make bench`)."""
    a, _ = make_cluster({"failover_timeout": 1}, start=(True, False))
    dead, live = recv.dead(), recv.udp()
    ev = a.new_event()
    a.subscribe(ev, virtual("FAILOVER", dead, live))
    before = a.virtual_stats()
    assert raise_one(a, ev, 0, [dead, live]) == [1]  # failing: a transition
    a.send_sip(ev, count=500)                         # a burst from a worker
    live.wait_count(501, ev, timeout=10)
    dead.bind()
    seq = iter(range(1, 1000))                        # recovered: another one
    wait_until(lambda: raise_one(a, ev, next(seq), [dead, live]) == [0], 10,
               "A to find its first subscriber back", interval=0.1)
    after = a.virtual_stats()
    assert after["events_failed"] == before["events_failed"]
    assert cluster_stats(a) == {"sent": 0, "received": 0, "dropped": 0}
    assert not a.log.errors_since(0, module="event_virtual")
    a.assert_alive()


def test_a_node_that_comes_back_learns_what_the_other_finds_failing(make_cluster, recv):
    """B dies (kill -9) and starts again: A tells it, when its link comes
    up, what A finds failing, so that B skips it from its first event."""
    dead, live = recv.dead(), recv.udp()
    ev = EVENT_POOL[0]
    startup = f'    subscribe_event("{ev}", "{virtual("FAILOVER", dead, live)}");'
    a, b = make_cluster({"failover_timeout": 60, "startup_route": startup},
                        {"failover_timeout": 60, "startup_route": startup})
    assert a.new_event() == b.new_event() == ev
    b.kill_all()

    assert raise_one(a, ev, 0, [dead, live]) == [1]  # failing, B down
    wait_until(lambda: cluster.link_state(a, B) != "Up", 10, "A to see B down",
               interval=0.1)
    # (the first write to B's dead connection may have seemed to go out)
    b.start()
    # A tells B once it sees B's link up (whether B sees A's yet or not)
    wait_until(lambda: sub(b, ev, 0).get("from_node") == A, 30,
               "B, back, to hear from A what fails")
    dead.bind()
    assert raise_one(b, ev, 1, [dead, live]) == [1]
    s = sub(b, ev, 0)
    assert s["state"] == "skipped" and s["attempts"] == 0, s


def test_malformed_and_foreign_packets_are_dropped_and_counted(make_cluster, recv):
    """Packets crafted as node B would send them (same node id, same IP),
    on A's bin socket: each bad one is dropped and counted, A lives, and
    the good one at the end is heard."""
    a, b = make_cluster()
    dead, live = recv.dead(), recv.udp()
    ev = a.new_event()
    text = virtual("FAILOVER", dead, live)
    a.subscribe(ev, text)
    canon = text.removeprefix("virtual:")
    good = [ev, canon, 0, 1, 500]                  # subscriber 0 failing 0.5 s
    bad = [
        cluster.bin_packet(good, version=2),       # a version A does not speak
        cluster.bin_packet(good, kind=9),          # an unknown packet type
        cluster.bin_packet([ev]),                  # no socket
        cluster.bin_packet([ev, canon, 0, 1]),     # no age
        cluster.bin_packet([ev, b"\xff\x00ab"]),   # a string past the end
        cluster.bin_packet(good + [7]),            # a field too many
        cluster.bin_packet([ev, canon, 0, 3, 0]),  # no such state
        cluster.bin_packet(["E_NOPE", canon, 0, 1, 500]),   # no such event
        cluster.bin_packet([ev, "FAILOVER udp:x:1", 0, 1, 500]),  # no such subscription
        cluster.bin_packet([ev, canon, 5, 1, 500]),          # no such subscriber
    ]
    # a node id the cluster does not have: the clusterer drops it before us
    stranger = cluster.bin_packet(good, src=7)
    cluster.send_bin(cluster.bin_port(a), bad + [stranger, cluster.bin_packet(good)])
    expected = {"sent": 0, "received": len(bad) + 1, "dropped": len(bad)}
    wait_until(lambda: cluster_stats(a) == expected, 5,
               f"A to receive the packets and drop the bad ones ({expected})")
    a.assert_alive()
    wait_until(lambda: "from_node" in sub(a, ev, 0), 2, "A to hear the good packet")
    s = sub(a, ev, 0)
    assert s["from_node"] == B and s["state"] == "skipped" and s["attempts"] == 0, s
    b.assert_alive()


# cluster_id set where it cannot work: the server does not start, and says why
NO_CLUSTER = [
    ({"virtual_params": {"cluster_id": 1}},
     "cluster_id 1 needs the clusterer module: load clusterer.so"),
    ({**cluster.node_options(1, [10001, 10002]), "virtual_params": {"cluster_id": 5}},
     "the clusterer refused capability 'event_virtual-repl' in cluster 5"),
    ({"virtual_params": {"cluster_id": -1}}, "cluster_id must be 0 (off) or a cluster's id"),
]


@pytest.mark.parametrize("options,message", NO_CLUSTER, ids=["no clusterer", "no such cluster",
                                                             "negative"])
def test_a_cluster_that_cannot_work_refuses_to_start(tmp_path, options, message):
    srv = OpenSips(tmp_path, **options)
    with pytest.raises(pytest.fail.Exception):
        srv.start(attempts=1)
    srv.stop()
    errors = [l for l in srv.log.text().splitlines() if "ERROR:event_virtual:" in l]
    assert any(message in l for l in errors), srv.log.tail(20)


class LoadedFirst(OpenSips):
    """event_virtual loaded before the clusterer."""

    def modules(self):
        mods = super().modules()
        return [mods[-1]] + mods[:-1]


def test_the_clusterer_starts_first_whatever_the_load_order(tmp_path):
    """cluster_id makes the clusterer a dependency: the core initialises it
    first, so that the capability finds its cluster."""
    srv = LoadedFirst(tmp_path, **cluster.node_options(1, cluster.ports(2)))
    try:
        srv.start(attempts=1)
        lines = srv.log.text().splitlines()
        ours = next(i for i, l in enumerate(lines) if "sharing subscriber health" in l)
        theirs = next(i for i, l in enumerate(lines) if "clusterer:mod_init" in l)
        assert theirs < ours
        cfg = srv.cfg_path.read_text()
        assert cfg.index("event_virtual.so") < cfg.index("clusterer.so"), "not loaded first"
        srv.assert_alive()
    finally:
        srv.stop()
