"""Fixtures: real OpenSIPS servers, event receivers, a RabbitMQ broker.

Server options come from the `server` marker, on a test or a whole module
(`pytestmark = pytest.mark.server(failover_timeout=1)`; the closest marker
wins); its keywords are those of evvharness.OpenSips: failover_timeout,
stream_timeout (ms), extra_modules ({module: {param: value}}), workers,
log_level. OPENSIPS_SRC and EVV_MODULE: see evvharness/env.py.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evvharness import (EVV_MODULE, OPENSIPS_SRC, OpenSips, RabbitMQBroker,  # noqa: E402
                        Receivers, check_prerequisites, cluster)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "server(**options): options of the OpenSIPS that srv, own_srv and "
        "make_srv give (keywords of evvharness.OpenSips)")


def pytest_report_header(config):
    return [f"OPENSIPS_SRC={OPENSIPS_SRC}", f"EVV_MODULE={EVV_MODULE}"]


@pytest.fixture(scope="session", autouse=True)
def _prerequisites():
    check_prerequisites()


def _server_options(request):
    old = [n for n in ("FAILOVER_TIMEOUT", "STREAM_TIMEOUT_MS", "EXTRA_MODULES")
           if hasattr(request.module, n)]
    if old:  # a test written for the old harness: do not run it with defaults
        pytest.fail(f"{request.module.__name__} sets {', '.join(old)}: server options are "
                    f"pytest.mark.server(failover_timeout=s, stream_timeout=ms, "
                    f"extra_modules={{module: {{param: value}}}}) now", pytrace=False)
    marker = request.node.get_closest_marker("server")
    if marker is None:
        return {}
    assert not marker.args, f"pytest.mark.server takes keywords only: {marker}"
    return dict(marker.kwargs)


@pytest.fixture(scope="module")
def _shared_servers():
    """The module's shared servers: {options as JSON: OpenSips}."""
    servers = {}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.call_failed = rep.failed


def _check_survived(request, server):
    """Teardown check, for tests that did not already fail (a server the
    test stopped itself is not checked)."""
    if getattr(request.node, "call_failed", True) or server.proc is None:
        return
    if not server.alive():
        pytest.fail(f"OpenSIPS died or stopped answering MI during this test; "
                    f"log {server.log.path}:\n{server.log.tail(30)}", pytrace=False)


@pytest.fixture
def srv(request, _shared_servers, tmp_path_factory):
    """A server shared by the module's tests with the same options (they
    use distinct event names); started again if an earlier test took it down."""
    options = _server_options(request)
    key = json.dumps(options, sort_keys=True)
    server = _shared_servers.get(key)
    if server is None or not server.alive():
        if server is not None:
            server.stop()
        server = OpenSips(tmp_path_factory.mktemp("opensips"), **options).start()
        _shared_servers[key] = server
    yield server
    _check_survived(request, server)


@pytest.fixture
def make_srv(request, tmp_path_factory):
    """make_srv(**overrides) -> a started server of this test's own, with
    the test's server options and the overrides."""
    servers = []

    def make(**overrides):
        options = {**_server_options(request), **overrides}
        servers.append(OpenSips(tmp_path_factory.mktemp("opensips"), **options).start())
        return servers[-1]

    yield make
    try:
        for s in servers:
            _check_survived(request, s)
    finally:
        for s in servers:
            s.stop()


# the spool's tests: a short retry interval, so that an event a unix
# receiver refused (EAGAIN: its queue is short) is retried at once
SPOOL_RETRY_MS = 50


@pytest.fixture
def spool_srv(make_srv):
    """spool_srv(failover_timeout=0, extra_modules=(), **spool modparams) ->
    a started server of this test's own with those event_virtual modparams
    (spool_retry_interval 50 ms unless given)."""
    def make(failover_timeout=0, extra_modules=(), **spool):
        return make_srv(failover_timeout=failover_timeout, extra_modules=extra_modules,
                        virtual_params={"spool_retry_interval": SPOOL_RETRY_MS, **spool})
    return make


@pytest.fixture
def make_cluster(make_srv, tmp_path_factory):
    """make_cluster(a_options, b_options, start=(True, True)) -> [node 1,
    node 2]: two servers of this test's own in one cluster
    (evvharness.cluster), with the test's server options and each node's
    own; a node not started is returned unstarted (a peer that is down).
    Both started: returned once node 1 sees node 2 up (node 1 can tell
    node 2)."""
    def make(a=None, b=None, start=(True, True)):
        ports = cluster.ports(2)
        nodes = []
        for node_id, (own, go) in enumerate(zip((a or {}, b or {}), start), 1):
            options = cluster.node_options(node_id, ports)
            for k, v in (own or {}).items():
                options[k] = {**options.get(k, {}), **v} if isinstance(v, dict) else v
            nodes.append(make_srv(**options) if go else
                         OpenSips(tmp_path_factory.mktemp("opensips"), **options))
        if all(start):
            cluster.wait_up(nodes[0], 2)
        return nodes
    return make


@pytest.fixture
def own_srv(make_srv):
    """A server of this test's own, for tests that may crash it."""
    return make_srv()


@pytest.fixture
def recv():
    """Receivers for this test (unix socket paths kept short under /tmp)."""
    d = tempfile.mkdtemp(prefix="evv-", dir="/tmp")
    r = Receivers(d)
    yield r
    r.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq_broker():
    """A RabbitMQ broker on free loopback ports, for the whole session.
    Cannot be started: the tests that use it fail, with the reason."""
    broker = RabbitMQBroker()
    try:
        broker.start()
    except AssertionError as e:  # BrokerError, or a wait that timed out
        broker.stop()
        pytest.fail(f"RabbitMQ broker not available: {e}", pytrace=False)
    yield broker
    broker.stop()
