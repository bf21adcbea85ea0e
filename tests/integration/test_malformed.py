"""Malformed virtual sockets are refused cleanly: MI error, one ERROR line
naming the offending token, the server alive, no shared memory kept."""

import pytest

from evvharness import MIError, OpenSips, wait_until

# (id, socket; {port} is a live UDP receiver, token the ERROR line must name)
CASES = [
    ("missing-policy", "virtual:udp:127.0.0.1:{port}", "udp:127.0.0.1:{port}"),
    ("misspelt-policy", "virtual:PARALLELX udp:127.0.0.1:{port}", "PARALLELX"),
    ("lowercase-policy", "virtual:parallel udp:127.0.0.1:{port}", "parallel"),
    ("no-subscribers", "virtual:FAILOVER", "FAILOVER"),
    ("no-subscribers-trailing-blanks", "virtual:FAILOVER \t ", "FAILOVER"),
    ("no-subscribers-round-robin", "virtual:ROUND-ROBIN", "ROUND-ROBIN"),
    ("empty", "virtual:", None),           # any event_virtual ERROR line
    ("blank", "virtual: \t ", None),
    ("unknown-transport", "virtual:PARALLEL bogus:1", "bogus"),
    ("no-transport", "virtual:ROUND-ROBIN udp:127.0.0.1:{port} justtext", "justtext"),
    ("nested-virtual", "virtual:PARALLEL virtual:FAILOVER udp:127.0.0.1:{port}",
     "virtual:FAILOVER"),
    ("transport-refuses", "virtual:ROUND-ROBIN udp:not_an_address", "udp:not_an_address"),
    ("refused-after-good", "virtual:PARALLEL udp:127.0.0.1:{port} udp:nonsense",
     "udp:nonsense"),
    ("refused-after-good-unix", "virtual:FAILOVER unix:{dir}/x.sock bogus:2", "bogus"),
]


@pytest.mark.parametrize("sock,token", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_socket_is_refused(srv, recv, sock, token):
    good = recv.udp()
    sock = sock.format(port=good.port, dir=recv.dir)
    token = token and token.format(port=good.port)
    ev = srv.new_event()

    def refused():
        try:
            srv.subscribe(ev, sock)
        except MIError as err:
            assert err.code == 400, err.error
        else:
            pytest.fail(f"malformed socket {sock!r} was accepted", pytrace=False)

    refused()  # warm-up: first-time allocations do not count as leaks
    baseline = srv.shm_used()
    mark = srv.log.mark()
    refused()

    def naming_lines():
        return srv.log.errors_since(mark, token=token, module="event_virtual")
    wait_until(naming_lines, 2, f"an event_virtual ERROR line naming {token or 'anything'!r}")
    assert len(naming_lines()) == 1, naming_lines()
    srv.assert_alive()
    assert srv.subscribers(ev) == []
    assert srv.shm_used() == baseline, "shared memory not released on refusal"


# modparams mod_init refuses: the server does not start, and says why
BAD_MODPARAMS = [
    ({"spool_retry_interval": -1}, "spool_retry_interval must be 10 ms or more, not -1"),
    ({"spool_retry_interval": 9}, "spool_retry_interval must be 10 ms or more, not 9"),
    ({"spool_max_memory": "lots"}, "spool_max_memory 'lots' is not a size"),
    ({"failover_timeout": -1}, "failover_timeout must be 0 or more seconds, not -1"),
]


@pytest.mark.parametrize("params,message", BAD_MODPARAMS, ids=[m[:24] for _, m in BAD_MODPARAMS])
def test_bad_modparam_refuses_to_start(tmp_path, params, message):
    srv = OpenSips(tmp_path, virtual_params=params)
    with pytest.raises(pytest.fail.Exception):
        srv.start(attempts=1)
    srv.stop()
    errors = [l for l in srv.log.text().splitlines() if "ERROR:event_virtual:" in l]
    assert any(message in l for l in errors), srv.log.tail(20)
