"""A throw-away RabbitMQ broker (Debian's rabbitmq-server), loopback only,
run as the `rabbitmq` user, for event_rabbitmq subscribers."""

import json
import logging
import os
import pwd
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .processes import spawn, stop_group
from .util import lasting_port, wait_until

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class BrokerError(AssertionError):
    pass


class RabbitMQBroker:
    """A broker of its own: its own node name, ports, data and log dirs (a
    temp dir owned by the rabbitmq user), run as the rabbitmq user in its
    own process group; and its own epmd on a free loopback port, started
    here in the foreground (in a process group of its own too) so that the
    Erlang node does not start a daemon that would outlive the run."""

    START_TIMEOUT = 60.0

    def __init__(self):
        self.proc = self.epmd = None
        self.dir = None
        self.amqp_port = self.dist_port = self.epmd_port = None

    def _env(self):
        d = self.dir
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(d),  # .erlang.cookie
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": "evv@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            # the distribution listener would bind every interface otherwise
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
        }

    def start(self):
        if not RABBITMQ_SERVER.is_file():
            raise BrokerError(f"{RABBITMQ_SERVER} not found: install Debian's rabbitmq-server")
        try:
            pw = pwd.getpwnam("rabbitmq")
        except KeyError:
            raise BrokerError("no `rabbitmq` user: install Debian's rabbitmq-server")
        if os.geteuid() != 0:
            raise BrokerError("starting the broker as the rabbitmq user needs root")
        try:
            import pika  # noqa: F401
        except ImportError:
            raise BrokerError("python module pika missing: pip install -r tests/requirements.txt")
        # pika logs every refused connect while the broker boots
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        self.dir = Path(tempfile.mkdtemp(prefix="evv-rmq-", dir="/tmp"))
        # halt() and resume() need the same ports back after seconds in
        # which clients keep connecting from ephemeral ports: none of these
        # is one
        ports = set()
        while len(ports) < 3:
            ports.add(lasting_port())
        self.amqp_port, self.dist_port, self.epmd_port = ports
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "advanced.config").write_text("[].\n")
        for p in [self.dir, *self.dir.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)
        self.out = self.dir / "console.log"
        self.epmd = spawn(["epmd", "-address", "127.0.0.1", "-port", self.epmd_port],
                          self.dir / "epmd.log", cwd=self.dir, env=self._env())
        wait_until(self._epmd_up, 10, f"epmd on 127.0.0.1:{self.epmd_port}", interval=0.05)
        return self._launch()

    def _launch(self):
        self.proc = spawn(["runuser", "-u", "rabbitmq", "--", RABBITMQ_SERVER],
                          self.out, cwd=self.dir, env=self._env())
        deadline = time.monotonic() + self.START_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"rabbitmq-server exited with status {self.proc.returncode} "
                                  f"before accepting AMQP:\n{self.log_tail()}")
            try:
                self.connect().close()
                return self
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.2)
        raise BrokerError(f"rabbitmq-server did not accept AMQP on 127.0.0.1:{self.amqp_port} "
                          f"within {self.START_TIMEOUT}s (last error: {last!r}):\n{self.log_tail()}")

    def _epmd_up(self):
        if self.epmd.poll() is not None:
            raise BrokerError(f"epmd exited with status {self.epmd.returncode}:\n"
                              f"{(self.dir / 'epmd.log').read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", self.epmd_port), 0.2).close()
            return True
        except OSError:
            return False

    def log_tail(self, n=30):
        parts = []
        for p in [self.out, *sorted((self.dir / "log").glob("*.log"))] if self.dir else []:
            try:
                parts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
            except OSError:
                pass
        return "\n".join(parts)

    def connect(self):
        import pika
        return pika.BlockingConnection(pika.ConnectionParameters(
            "127.0.0.1", self.amqp_port, credentials=pika.PlainCredentials("guest", "guest"),
            connection_attempts=1, socket_timeout=2, blocked_connection_timeout=5))

    def socket(self, queue, port=None):
        """The event_rabbitmq socket publishing to `queue` (default exchange)."""
        return f"rabbitmq:guest:guest@127.0.0.1:{port or self.amqp_port}/{queue}"

    def _channel_call(self, fn):
        c = self.connect()
        try:
            return fn(c.channel())
        finally:
            c.close()

    def declare(self, queue):
        self._channel_call(lambda ch: ch.queue_declare(queue, durable=False, auto_delete=False))
        return queue

    def queue_count(self, queue):
        return self._channel_call(
            lambda ch: ch.queue_declare(queue, passive=True).method.message_count)

    def drain(self, queue):
        """Every message in the queue now, decoded (JSON-RPC notifications)."""
        def get_all(ch):
            out = []
            while True:
                method, _props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return out
                try:
                    out.append(json.loads(body))
                except ValueError:
                    out.append({"raw": body})
        return self._channel_call(get_all)

    def halt(self):
        """Stop the node (SIGTERM: a clean shutdown) but keep its ports, its
        data dir and epmd, so that resume() brings the same node back."""
        if self.proc is not None:
            stop_group(self.proc, term_grace=30)
            self.proc = None

    def resume(self):
        """Start the node halt() stopped: same ports, same data (durable
        queues come back)."""
        assert self.proc is None and self.dir is not None
        return self._launch()

    def stop(self):
        if self.proc is not None:
            stop_group(self.proc, term_grace=20)
            self.proc = None
        if self.epmd is not None:
            stop_group(self.epmd)
            self.epmd = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
