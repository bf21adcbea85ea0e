"""Fixtures: real OpenSIPS servers and event receivers.

OPENSIPS_SRC  built OpenSIPS tree (default /usr/local/src/opensips)
EVV_MODULE    event_virtual.so under test (default <repo>/event_virtual.so);
              EVV_MODULE=$OPENSIPS_SRC/modules/event_virtual/event_virtual.so
              runs the suite against the C module.

A test module may set FAILOVER_TIMEOUT = N to get shared servers started
with modparam("event_virtual", "failover_timeout", N).
"""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evvharness import (EVV_MODULE, OPENSIPS_SRC, BrokerError, OpenSips,  # noqa: E402
                        RabbitMQBroker, Receivers, check_prerequisites)


def pytest_report_header(config):
    return [f"OPENSIPS_SRC={OPENSIPS_SRC}", f"EVV_MODULE={EVV_MODULE}"]


@pytest.fixture(scope="session", autouse=True)
def _prerequisites():
    check_prerequisites()


class _SharedServer:
    """A module-wide server, restarted if an earlier test took it down."""

    def __init__(self, tmp_path_factory, **kw):
        self.tmp_path_factory = tmp_path_factory
        self.kw = kw
        self.server = None

    def get(self):
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.server.stop()
            self.server = OpenSips(self.tmp_path_factory.mktemp("opensips"), **self.kw).start()
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()


def _server_kwargs(request):
    """Server options a test module may set: FAILOVER_TIMEOUT = s,
    STREAM_TIMEOUT_MS = ms (event_stream's timeout), EXTRA_MODULES =
    [("event_rabbitmq", [("param", value), ...]), ...]."""
    m = request.module
    return {"failover_timeout": getattr(m, "FAILOVER_TIMEOUT", None),
            "stream_timeout": getattr(m, "STREAM_TIMEOUT_MS", None),
            "extra_modules": getattr(m, "EXTRA_MODULES", ())}


@pytest.fixture(scope="module")
def _shared_server(request, tmp_path_factory):
    holder = _SharedServer(tmp_path_factory, **_server_kwargs(request))
    yield holder
    holder.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.call_failed = rep.failed


def _check_survived(request, server, when):
    """Teardown check, for tests that did not already fail."""
    if getattr(request.node, "call_failed", True):
        return
    if not server.alive():
        pytest.fail(f"OpenSIPS died or stopped answering MI {when}; "
                    f"log {server.log.path}:\n{server.log.tail(30)}", pytrace=False)


@pytest.fixture
def srv(request, _shared_server):
    """The module's shared server (tests on it use distinct event names)."""
    server = _shared_server.get()
    yield server
    _check_survived(request, server, "during this test")


@pytest.fixture
def own_srv(request, tmp_path_factory):
    """A server of this test's own, for tests that may crash it."""
    server = OpenSips(tmp_path_factory.mktemp("opensips"), **_server_kwargs(request)).start()
    yield server
    try:
        _check_survived(request, server, "during this test")
    finally:
        server.stop()


@pytest.fixture
def recv():
    """Receivers for this test (unix socket paths kept short under /tmp)."""
    d = tempfile.mkdtemp(prefix="evv-", dir="/tmp")
    r = Receivers(d)
    yield r
    r.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_srv(request, tmp_path_factory):
    """make_srv(**overrides) -> a started server of this test's own, with
    the test module's options (see _server_kwargs) and the overrides."""
    servers = []

    def make(**overrides):
        kw = _server_kwargs(request)
        kw.update(overrides)
        s = OpenSips(tmp_path_factory.mktemp("opensips"), **kw).start()
        servers.append(s)
        return s

    yield make
    try:
        for s in servers:
            _check_survived(request, s, "during this test")
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="session")
def rabbitmq_broker():
    """A RabbitMQ broker on free loopback ports, for the whole session.
    Cannot be started: the tests that use it fail, with the reason."""
    broker = RabbitMQBroker()
    try:
        broker.start()
    except BrokerError as e:
        broker.stop()
        pytest.fail(f"RabbitMQ broker not available: {e}", pytrace=False)
    yield broker
    broker.stop()
