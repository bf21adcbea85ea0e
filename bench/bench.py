#!/usr/bin/env python3
"""Benchmark of event_virtual (`make bench`): what the virtual layer costs on
every delivery path, next to the transports it calls, with this module and
with the C module shipped with OpenSIPS.

Starts two real OpenSIPS (from $OPENSIPS_SRC) whose UDP worker processes
raise events in a script loop, one with the module under test ($EVV_MODULE,
default <repo>/event_virtual.so), one with the C module
$OPENSIPS_SRC/modules/event_virtual/event_virtual.so when it is built (the
two cannot be loaded together; both run at once and each measurement is taken
on one then the other; the spool replay rows run on a third OpenSIPS with
this module), and prints rates and the ratios to compare:

  sync      direct UDP, ROUND-ROBIN / FAILOVER / PARALLEL x3 over UDP, each
            raised with two parameters and without any;
  scale     ROUND-ROBIN and FAILOVER over 100 and 1000 subscribers, and
            ROUND-ROBIN x3 with one dead subscriber against ROUND-ROBIN x2;
  async     event_stream (reliable mode, a local JSON-RPC server answering at
            once): direct, direct x2 in turn (the transport's work of a
            ROUND-ROBIN x2), FAILOVER x2, ROUND-ROBIN x2;
  rabbitmq  the same over a local RabbitMQ broker (event_rabbitmq);
  spool     ROUND-ROBIN and FAILOVER x3 over UDP with SPOOL(1000), on and
            empty (UDP subscribers never fail), against the same without;
            and the replay: events per second a FAILOVER SPOOL queue full of
            --spool-events event_stream events drains into its subscriber
            when it comes back (ours only, on a third OpenSIPS with
            failover_timeout 0 and spool_retry_interval 50), against the
            direct event_stream rate;
  durable   restart persistency on (issue 17), this module only: ROUND-ROBIN and
            FAILOVER x3 with SPOOL(1000) on an OpenSIPS of their own, on and
            empty, against the same with it off (the spool rows); and the
            replay after a restart: --spool-events held event_stream events,
            a clean stop and a start, then events per second from the
            subscription made again until the last held event was replayed
            (the claim, within ~1 s, is part of the time), against the spool
            replay without a restart.
  cluster   ROUND-ROBIN and FAILOVER x3 over UDP on node 1 of a two-node
            cluster (clusterer, proto_bin, event_virtual's cluster_id; node
            2 up, every subscriber healthy), and ROUND-ROBIN x3 with one
            dead subscriber on node 1 of a cluster whose node 2 is down,
            against the same on the server without a cluster (ours only,
            on more OpenSIPS).

Rows are in ROWS below, one line each; `--only GROUP,...` picks groups (the
rows they are compared to come along). Synchronous rows: rate = raises per
second of all workers together (the loop's wall-clock time). Asynchronous
rows: rate = events whose delivery was reported per second, from the first
raise until the server got (and answered) every event and, for this module's
virtual rows, event_virtual:events_delivered counted them all.

Everything started (OpenSIPS, the JSON-RPC server, the broker) runs in its
own process group, dies with the bench (PR_SET_PDEATHSIG) and is also killed
by a small reaper process when the bench dies any other way (kill -9).
Nothing here asserts timings; it only reports them.
"""

import argparse
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))

# the only names taken from the test harness
from evvharness import OpenSips, RabbitMQBroker, cluster, sip_request, virtual  # noqa: E402
from evvharness.env import EVV_MODULE, OPENSIPS_SRC  # noqa: E402
from evvharness.processes import die_with_parent, group_alive  # noqa: E402

C_MODULE = OPENSIPS_SRC / "modules" / "event_virtual" / "event_virtual.so"

GROUPS = ("sync", "scale", "async", "rabbitmq", "spool", "durable", "cluster")


# --------------------------------------------------------------------------
# the rows: one line each
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    group: str          # GROUPS
    key: str            # event B_<key>; other rows name it in `base`
    label: str
    transport: str      # udp | udp+dead (first subscriber dead) | stream | rmq
    policy: str = None  # None: a direct subscription
    n: int = 1          # subscribers
    params: bool = False  # raised with two parameters (tag, pid) or none
    base: str = None    # key of the row it is compared to
    share: int = 1      # ideal = base rate / share (PARALLEL x3: 3)
    target: float = None  # reported (never asserted): ratio to the ideal >= target
    c_has_it: bool = True  # False: a policy the C module does not have
    durable: bool = False  # on an OpenSIPS with restart_persistency on
    cluster: str = None  # "up" / "down": on node 1 of a cluster, node 2 up or down

    @property
    def event(self):
        return f"B_{self.key}"

    @property
    def events(self):
        """A direct row over n > 1 subscribers subscribes n events, one
        each, and the script raises them in turn: the transport's work of a
        ROUND-ROBIN x n without the virtual layer."""
        if self.policy is None and self.n > 1:
            return [self.event] + [f"{self.event}_{i}" for i in range(1, self.n)]
        return [self.event]


RR, FO, PAR = "ROUND-ROBIN", "FAILOVER", "PARALLEL"
ROWS = [
    Row("sync", "D_P", "direct UDP, 2 params", "udp", params=True),
    Row("sync", "RR_P", "ROUND-ROBIN x3, 2 params", "udp", RR, 3, True, "D_P", target=0.9),
    Row("sync", "FO_P", "FAILOVER x3, 2 params", "udp", FO, 3, True, "D_P", target=0.9),
    Row("sync", "PA_P", "PARALLEL x3, 2 params", "udp", PAR, 3, True, "D_P", 3, 0.9),
    Row("sync", "HA_P", "HASH(pid) x3, 2 params", "udp", "HASH(pid)", 3, True, "D_P",
        target=0.9, c_has_it=False),
    Row("sync", "D_N", "direct UDP, no params", "udp"),
    Row("sync", "RR_N", "ROUND-ROBIN x3, no params", "udp", RR, 3, False, "D_N", target=0.9),
    Row("sync", "FO_N", "FAILOVER x3, no params", "udp", FO, 3, False, "D_N", target=0.9),
    Row("sync", "PA_N", "PARALLEL x3, no params", "udp", PAR, 3, False, "D_N", 3, 0.9),
    Row("scale", "RR_100", "ROUND-ROBIN x100, no params", "udp", RR, 100, False, "RR_N"),
    Row("scale", "RR_1000", "ROUND-ROBIN x1000, no params", "udp", RR, 1000, False, "RR_N",
        target=0.9),
    Row("scale", "FO_100", "FAILOVER x100, no params", "udp", FO, 100, False, "FO_N"),
    Row("scale", "FO_1000", "FAILOVER x1000, no params", "udp", FO, 1000, False, "FO_N",
        target=0.9),
    Row("scale", "RR_2", "ROUND-ROBIN x2, no params", "udp", RR, 2),
    Row("scale", "RR_DEAD", "ROUND-ROBIN x3, 1 dead, no params", "udp+dead", RR, 3, False,
        "RR_2", target=0.9),
    Row("async", "SD", "direct event_stream, 2 params", "stream", params=True),
    Row("async", "SD2", "direct event_stream x2 in turn, 2 params", "stream", None, 2, True,
        "SD"),
    Row("async", "SFO", "FAILOVER x2 event_stream, 2 params", "stream", FO, 2, True, "SD",
        target=0.9),
    Row("async", "SRR", "ROUND-ROBIN x2 event_stream, 2 params", "stream", RR, 2, True, "SD",
        target=0.9),
    Row("rabbitmq", "QD", "direct RabbitMQ, 2 params", "rmq", params=True),
    Row("rabbitmq", "QD2", "direct RabbitMQ x2 in turn, 2 params", "rmq", None, 2, True, "QD"),
    Row("rabbitmq", "QFO", "FAILOVER x2 RabbitMQ, 2 params", "rmq", FO, 2, True, "QD",
        target=0.9),
    Row("rabbitmq", "QRR", "ROUND-ROBIN x2 RabbitMQ, 2 params", "rmq", RR, 2, True, "QD",
        target=0.9),
    Row("spool", "RR_S", "ROUND-ROBIN x3 SPOOL(1000), no params", "udp", f"{RR} SPOOL(1000)",
        3, False, "RR_N", target=0.9, c_has_it=False),
    Row("spool", "FO_S", "FAILOVER x3 SPOOL(1000), no params", "udp", f"{FO} SPOOL(1000)",
        3, False, "FO_N", target=0.9, c_has_it=False),
    # measured by ReplayRun: rate = held events replayed per second
    Row("spool", "SPR", "FAILOVER SPOOL replay, event_stream, 2 params", "replay",
        f"{FO} SPOOL({{n}})", 1, True, "SD", c_has_it=False),
    Row("durable", "RR_SD", "ROUND-ROBIN x3 SPOOL(1000) durable, no params", "udp",
        f"{RR} SPOOL(1000)", 3, False, "RR_S", target=0.95, c_has_it=False, durable=True),
    Row("durable", "FO_SD", "FAILOVER x3 SPOOL(1000) durable, no params", "udp",
        f"{FO} SPOOL(1000)", 3, False, "FO_S", target=0.95, c_has_it=False, durable=True),
    # measured by ReplayRun (durable): held, a clean stop and a start, replayed
    Row("durable", "SPRR", "FAILOVER SPOOL replay after a restart, event_stream, 2 params",
        "replay", f"{FO} SPOOL({{n}})", 1, True, "SPR", c_has_it=False, durable=True),
    # measured by ClusterRun, on node 1 of a two-node cluster, node 2 up or down
    Row("cluster", "RR_CL", "ROUND-ROBIN x3, cluster on, no params", "udp", RR, 3, False,
        "RR_N", target=0.9, c_has_it=False, cluster="up"),
    Row("cluster", "FO_CL", "FAILOVER x3, cluster on, no params", "udp", FO, 3, False,
        "FO_N", target=0.9, c_has_it=False, cluster="up"),
    Row("cluster", "RR_CLD", "ROUND-ROBIN x3, 1 dead, cluster on, peer down, no params",
        "udp+dead", RR, 3, False, "RR_DEAD", target=0.9, c_has_it=False, cluster="down"),
]
BY_KEY = {r.key: r for r in ROWS}
# ratios printed under the tables besides each row's own: (row, compared to)
DERIVED = [("SRR", "SD2"), ("QRR", "QD2")]
ASYNC = ("stream", "rmq", "replay")

# distinct UDP sinks per row; longer lists repeat them (a list may repeat tokens)
MAX_DISTINCT_SINKS = 10
# failures stay skipped for the whole run (the dead-subscriber row)
FAILOVER_TIMEOUT = 3600


def select_rows(groups):
    """Rows of the groups, plus the rows they are compared to (and theirs)."""
    keys = {r.key for r in ROWS if r.group in groups}
    while True:
        more = {r.base for r in ROWS if r.key in keys and r.base} - keys
        if not more:
            return [r for r in ROWS if r.key in keys]
        keys |= more


# --------------------------------------------------------------------------
# clean-up whatever happens: a reaper process and signal handlers
# --------------------------------------------------------------------------

class Reaper:
    """A child process in its own session that outlives the bench only to
    clean up after it: the bench tells it each process group, epmd port and
    folder it creates; when its stdin closes (the bench ended, however:
    normal exit, exception, SIGKILL) it kills the groups still alive, stops
    those epmd daemons and removes the folders. After a normal stop there is
    nothing left for it to do."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--reaper"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

    def tell(self, kind, value):
        try:
            self.proc.stdin.write(f"{kind} {value}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def reaper_main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups, epmds, dirs = [], [], []
    for line in sys.stdin:
        kind, _, value = line.strip().partition(" ")
        if kind == "pgid":
            groups.append(int(value))
        elif kind == "epmd":
            epmds.append(value)
        elif kind == "dir":
            dirs.append(value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [g for g in groups if group_alive(g)]
        for g in live:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while live and time.monotonic() < deadline:
            live = [g for g in live if group_alive(g)]
            time.sleep(0.05)
    for port in epmds:
        subprocess.run(["epmd", "-kill"], capture_output=True, timeout=10, env={
            "PATH": "/usr/sbin:/usr/bin:/bin", "ERL_EPMD_PORT": port,
            "ERL_EPMD_ADDRESS": "127.0.0.1"})
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------
# OpenSIPS with the bench script
# --------------------------------------------------------------------------

BENCH_CFG = """\
{core}log_level = {log_level}
stderror_enabled = yes
syslog_enabled = no
disable_core_dump = yes
max_while_loops = 1000000000
udp_workers = {workers}
socket = udp:127.0.0.1:{sip_port}

mpath = "{mpath}"
loadmodule "proto_udp.so"
loadmodule "sl.so"
modparam("sl", "enable_stats", 0)
loadmodule "mi_datagram.so"
modparam("mi_datagram", "socket_name", "udp:127.0.0.1:{mi_port}")
loadmodule "event_datagram.so"
loadmodule "event_stream.so"
modparam("event_stream", "reliable_mode", 1)
# a late answer (default 1 s) is a failure that FAILOVER and ROUND-ROBIN
# pass on to the next subscriber, a second delivery: not on a loaded machine
modparam("event_stream", "timeout", 10000)
{rabbitmq}loadmodule "{module}"
modparam("event_virtual", "failover_timeout", {failover_timeout})
{extra}
# "X-Event: B_x" + "X-Count: N": raise B_x N times in this worker (with
# params tag, pid - set once, outside the loop - or none), then reply
# "200 done <pid> <raises> <raises that returned an error>".
route {{
    if ($hdr(X-Event) == NULL)
        exit;
    $var(n) = $(hdr(X-Count){{s.int}});
    $var(i) = 0;
    $avp(evk) := "tag";
    $avp(evk) = "pid";
    $avp(evv) := $hdr(X-Tag);
    $avp(evv) = $pp;
    $var(f) = 0;
    switch ($hdr(X-Event)) {{
{cases}
    }}
    sl_send_reply(200, "done $pp $var(i) $var(f)");
    exit;
}}
"""

CASE = """\
        case "{ev}":
            while ($var(i) < $var(n)) {{
{raises}
                $var(i) = $var(i) + {step};
            }}
            break;"""
RAISE = """                if (!raise_event("{ev}"{args}))
                    $var(f) = $var(f) + 1;"""


class BenchOpenSips(OpenSips):
    """The harness's server (start, stop, MI) with the bench script."""

    def __init__(self, workdir, module, rows, args, rabbitmq, failover_timeout=None,
                 extra="", durable=None):
        super().__init__(workdir, workers=args.workers, log_level=args.log_level)
        self.module = Path(module)
        self.rows = rows
        self.rabbitmq = rabbitmq
        self.failover_timeout = FAILOVER_TIMEOUT if failover_timeout is None \
            else failover_timeout
        self.extra = extra
        self.core_lines = ""
        if durable:  # spool_max_memory in MB: restart persistency on
            self.core_lines = (f'restart_persistency_cache_file = "{self.workdir}/rpm.cache"\n'
                               f"restart_persistency_size = {2 * durable + 4}\n")
            self.extra += 'modparam("event_virtual", "restart_persistency", 1)\n'

    def _write_cfg(self):
        def case(r):
            args = ", $avp(evk), $avp(evv)" if r.params else ""
            return CASE.format(ev=r.event, step=len(r.events), raises="\n".join(
                RAISE.format(ev=e, args=args) for e in r.events))
        cases = "\n".join(case(r) for r in self.rows)
        rmq = ('loadmodule "event_rabbitmq.so"\n'
               'modparam("event_rabbitmq", "connect_timeout", 500)\n' if self.rabbitmq else "")
        cfg = BENCH_CFG.format(
            core=self.core_lines, log_level=self.log_level, workers=self.workers,
            sip_port=self.sip_port, mi_port=self.mi_port, mpath=f"{OPENSIPS_SRC}/modules/", module=self.module,
            failover_timeout=self.failover_timeout, extra=self.extra, rabbitmq=rmq,
            cases=cases)
        self.cfg_path = self.workdir / "opensips.cfg"
        self.cfg_path.write_text(cfg)

    def start(self, attempts=3):
        try:
            return super().start(attempts)
        except (KeyboardInterrupt, Interrupted):
            raise
        except BaseException as e:  # the harness fails through pytest.fail
            raise SystemExit(f"bench: {e}") from None


def megabytes(size):
    """A spool_max_memory text (K, M or G) in whole MB, rounded up."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    u = size[-1:].upper()
    n = int(size[:-1]) * units[u] if u in units else int(size)
    return -(-n // (1 << 20))


def cpu_ns(pids):
    """CPU time (ns, user + system) the processes used so far
    (/proc/PID/schedstat: first field, time spent on a CPU)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# subscribers: UDP sinks, the JSON-RPC server, RabbitMQ queues
# --------------------------------------------------------------------------

class RpcServer:
    """bench/rpcserver.py in its own process group: answers every JSON-RPC
    request at once; counts them per method (event)."""

    def __init__(self, reaper):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "rpcserver.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
            preexec_fn=die_with_parent)
        reaper.tell("pgid", self.proc.pid)

    def _cmd(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise SystemExit(f"bench: the JSON-RPC server does not answer ({cmd})")
        return line.strip()

    def listen(self):
        return f"tcp:127.0.0.1:{self._cmd('listen')}"

    def counts(self):
        return json.loads(self._cmd("counts"))

    def reserve(self):
        """A port bound but not listening: a subscriber that is down."""
        return int(self._cmd("reserve"))

    def open(self, port):
        self._cmd(f"open {port}")

    def close_port(self, port):
        ans = self._cmd(f"close {port}")
        if ans != "ok":
            raise SystemExit(f"bench: the JSON-RPC server could not close {port}: {ans}")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)


class Broker:
    """A throw-away RabbitMQ broker (the harness's) plus one AMQP connection
    kept open to count and purge the bench's queues."""

    def __init__(self, reaper):
        self.rmq = RabbitMQBroker()
        self.reaper = reaper
        self.conn = None
        self.queues = {}  # event -> [queue names]

    def start(self):
        # the harness starts the broker in a new process group: tell the
        # reaper as soon as it exists
        real_popen = subprocess.Popen
        reaper = self.reaper

        rmq = self.rmq

        def popen(*a, **kw):
            p = real_popen(*a, **kw)
            reaper.tell("pgid", p.pid)
            reaper.tell("epmd", rmq.epmd_port)
            reaper.tell("dir", rmq.dir)
            return p
        subprocess.Popen = popen
        try:
            self.rmq.start()
        finally:
            subprocess.Popen = real_popen
        self.conn = self.rmq.connect()
        self.ch = self.conn.channel()

    def socket(self, event, i):
        q = f"{event.lower()}-{i}"
        self.ch.queue_declare(q, durable=False, auto_delete=False)
        qs = self.queues.setdefault(event, [])
        if q not in qs:  # the second OpenSIPS run subscribes the same queues
            qs.append(q)
        return self.rmq.socket(q)

    def count(self, event):
        return sum(self.ch.queue_declare(q, passive=True).method.message_count
                   for q in self.queues.get(event, []))

    def purge(self, event):
        for q in self.queues.get(event, []):
            self.ch.queue_purge(q)

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        self.rmq.stop()


class Subscribers:
    """What the rows subscribe to; one set per OpenSIPS run."""

    def __init__(self, workdir, rpc, broker):
        self.workdir = Path(workdir)
        self.rpc = rpc
        self.broker = broker
        self.sinks = []

    def udp(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))  # bound, never read
        self.sinks.append(s)
        return f"udp:127.0.0.1:{s.getsockname()[1]}"

    def sockets_for(self, row):
        """One socket per event of the row (Row.events)."""
        if len(row.events) > 1:
            one = Row(row.group, row.key, row.label, row.transport)
            return [self.socket_for(one, ev) for ev in row.events]
        return [self.socket_for(row, row.event)]

    def socket_for(self, row, event):
        if row.transport == "stream":
            subs = [self.rpc.listen() for _ in range(row.n)]
        elif row.transport == "rmq":
            subs = [self.broker.socket(event, i) for i in range(row.n)]
        else:
            distinct = [self.udp() for _ in range(min(row.n, MAX_DISTINCT_SINKS))]
            subs = [distinct[i % len(distinct)] for i in range(row.n)]
            if row.transport == "udp+dead":
                subs[0] = f"unix:{self.workdir}/dead-{row.key}.sock"  # nobody binds it
        return subs[0] if row.policy is None else virtual(row.policy, *subs)

    def delivered(self, row):
        """Events of the row the subscribers got so far (async rows)."""
        if row.transport == "stream":
            counts = self.rpc.counts()
            return sum(counts.get(ev, 0) for ev in row.events)
        return sum(self.broker.count(ev) for ev in row.events)

    def close(self):
        for s in self.sinks:
            s.close()


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------

class Runner:
    """Sends W requests at once, one per UDP worker (a worker busy in its
    loop does not read the shared SIP socket, so they land on W different
    workers; every reply carries the worker's $pp and the measurement is
    repeated if two replies come from one process)."""

    def __init__(self, srv, subs, workers, ours):
        self.srv = srv
        self.subs = subs
        self.workers = workers
        self.ours = ours
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.lport = self.sock.getsockname()[1]
        self.seq = 0
        self.worker_pids = set()
        self.all_pids = srv.pids()
        self.raised = {}  # event -> raises so far, warm-up included
        self.failed = {}  # event -> raises that returned an error

    def once(self, event, count, timeout=120):
        """(t0, time of the last reply, worker pids that answered)."""
        msgs = []
        for _ in range(self.workers):
            self.seq += 1
            msgs.append((self.seq, sip_request(self.srv.sip_port, self.lport,
                                               self.seq, event, count)))
        wanted = {f"CSeq: {s} OPTIONS" for s, _ in msgs}
        dest = ("127.0.0.1", self.srv.sip_port)
        t0 = time.perf_counter()
        for _, m in msgs:
            self.sock.sendto(m, dest)
        pids = []
        t1 = t0
        deadline = time.monotonic() + timeout
        while wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                self.srv._check_running()
                raise SystemExit(f"bench: no reply to {event} x {count} within {timeout}s; "
                                 f"log {self.srv.log.path}")
            self.sock.settimeout(min(left, 1.0))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                self.srv._check_running()
                continue
            t1 = time.perf_counter()
            lines = data.decode(errors="replace").split("\r\n")
            cseq = next((l for l in lines if l.startswith("CSeq:")), None)
            if cseq not in wanted:
                continue  # a late reply of an earlier request
            wanted.discard(cseq)
            parts = lines[0].split(" ")  # SIP/2.0 200 done <pid> <raises> <failed>
            if not lines[0].startswith("SIP/2.0 200 done ") or len(parts) != 6:
                raise SystemExit(f"bench: unexpected reply {lines[0]!r}")
            if int(parts[4]) != count:
                raise SystemExit(f"bench: worker {parts[3]} raised {parts[4]} times, "
                                 f"not {count}; log {self.srv.log.path}")
            pids.append(int(parts[3]))
            self.raised[event] = self.raised.get(event, 0) + count
            self.failed[event] = self.failed.get(event, 0) + int(parts[5])
        return t0, t1, pids

    def measure(self, row, count, retries=5):
        """(rate, CPU figure) of one measurement, or (None, reason)."""
        step = len(row.events)
        count = -(-count // step) * step  # the script raises them in turn
        for _ in range(retries):
            before = self._before(row)
            wcpu0 = cpu_ns(self.worker_pids)
            acpu0 = cpu_ns(self.all_pids)
            t0, t1, pids = self.once(row.event, count)
            total = self.workers * count
            # asynchronous rows count deliveries and the CPU of every
            # process: which worker raised does not matter
            if len(set(pids)) != self.workers and row.transport not in ASYNC:
                log(f"  ({row.key}: replies from pids {pids}: not one request per worker, again)")
                continue
            if row.transport in ASYNC:
                t_end, why = self._settle(row, before, total)
                if why:
                    return None, why
                cpu = (cpu_ns(self.all_pids) - acpu0) / 1e9
                return total / (t_end - t0), (cpu * 1e6 / total if cpu > 0 else float("nan"))
            cpu = (cpu_ns(self.worker_pids) - wcpu0) / 1e9
            if set(pids) != self.worker_pids:  # first time (warm-up): learn them
                self.worker_pids = set(pids)
                cpu = 0.0
            return total / (t1 - t0), (total / cpu if cpu > 0 else float("nan"))
        raise SystemExit(f"bench: could not get one request per worker for {row.key}")

    # asynchronous rows: done when the subscribers got every event and, for
    # this module's virtual rows, event_virtual:events_delivered counted them

    def _before(self, row):
        if row.transport not in ASYNC:
            return None
        if row.transport == "rmq":
            for ev in row.events:
                self.subs.broker.purge(ev)
        stats = self.srv.virtual_stats() if self.ours and row.policy else None
        return self.subs.delivered(row), stats

    def _settle(self, row, before, total, stall=5.0):
        """(time the last event was reported delivered, None) or (None, why)."""
        got0, stats0 = before
        last, t_last = -1, time.monotonic()
        while True:
            got = self.subs.delivered(row) - got0
            now = time.perf_counter()
            if got >= total:
                t_end = now
                break
            if got != last:
                last, t_last = got, time.monotonic()
            elif time.monotonic() - t_last > stall:
                return None, f"{got} of {total} delivered"
            time.sleep(0.002)
        if got > total:
            return None, f"{got} deliveries for {total} events"
        if stats0 is not None:
            def done():
                s = self.srv.virtual_stats()
                return s["events_delivered"] - stats0["events_delivered"] >= total, s
            deadline = time.monotonic() + stall
            while True:
                ok, s = done()
                if ok:
                    t_end = time.perf_counter()
                    break
                if time.monotonic() > deadline:
                    return None, (f"events_delivered +{s['events_delivered'] - stats0['events_delivered']}"
                                  f" of {total}")
                time.sleep(0.002)
            if s["events_failed"] != stats0["events_failed"]:
                return None, f"events_failed +{s['events_failed'] - stats0['events_failed']}"
        return t_end, None

    def close(self):
        self.sock.close()


class ServerRun:
    """One OpenSIPS with one module: subscribes every row (measuring shared
    memory), warms up and sizes the rows, then measures a row at a time.
    results: {key: {"rate": [...], "cpu": [...], "shm": bytes, "error": str}}."""

    # the spool_max_memory of a durable server (restart persistency on), MB
    DURABLE_MB = 4

    def __init__(self, label, module, rows, args, workdir, reaper, rpc, broker,
                 durable=False):
        self.label = label
        self.module = module
        # the replay rows are ReplayRun's, the cluster rows ClusterRun's; the
        # durable rows a durable server's
        self.rows = [r for r in rows
                     if r.transport != "replay" and r.durable == durable and not r.cluster]
        self.args = args
        self.reaper = reaper
        extra = (f'modparam("event_virtual", "spool_max_memory", "{self.DURABLE_MB}M")\n'
                 if durable else "")
        self.srv = BenchOpenSips(workdir, module, self.rows, args,
                                 rabbitmq=broker is not None, extra=extra,
                                 durable=self.DURABLE_MB if durable else None)
        self.subs = Subscribers(workdir, rpc, broker)
        self.results = {r.key: {"rate": [], "cpu": [], "shm": None, "error": None,
                                "lost": []} for r in rows}
        for r in rows:
            if (r.transport == "replay" or r.durable) and label == "C":
                self.results[r.key]["error"] = "the C module has no spool"
            if r.cluster and label == "C":
                self.results[r.key]["error"] = "the C module has no cluster"
        self.runner = None
        self.counts = {}
        self.dead = None  # why this server is no longer measured

    def start(self):
        log(f"[{self.label}] starting OpenSIPS with {self.module}")
        self.srv.start()
        self.reaper.tell("pgid", self.srv.proc.pid)
        for r in self.rows:
            if self.label == "C" and not r.c_has_it:
                self.fail(r, "the C module has no spool" if "SPOOL(" in r.policy
                          else f"the C module has no {r.policy} policy")
                continue
            try:
                used0 = self.srv.shm_used()
                for ev, sock in zip(r.events, self.subs.sockets_for(r)):
                    self.srv.subscribe(ev, sock)
                self.results[r.key]["shm"] = self.srv.shm_used() - used0
            except Exception as e:  # an MI error: this module refuses it
                if isinstance(e, (KeyboardInterrupt, Interrupted)):
                    raise
                self.fail(r, f"subscribe failed: {e}")
        self.runner = Runner(self.srv, self.subs, self.args.workers,
                             ours=(self.label == "ours"))

    def fail(self, row, why):
        self.results[row.key]["error"] = why
        log(f"[{self.label}] {row.key}: {why}: row dropped")

    def live(self, row):
        return not self.results[row.key]["error"]

    def warm_up(self):
        """Lazy init, page faults; the first measurement tells the worker
        pids. Synchronous rows are sized to last about --seconds."""
        for r in self.rows:
            if not self.live(r):
                continue
            if r.transport in ASYNC:
                n = self.args.async_events
                rate, why = self.runner.measure(r, max(2, n // 10))
                if rate is None:
                    self.results[r.key]["lost"].append(f"warm-up: {why}")
                self.counts[r.key] = n
                continue
            n = 2000
            for _ in range(2):
                rate, _ = self.runner.measure(r, n)
                n = int(min(max(rate * self.args.seconds / self.args.workers, 1000), 10_000_000))
            self.counts[r.key] = n

    def measure(self, row, rnd):
        if row not in self.rows or not self.live(row):
            return
        rate, cpu = self.runner.measure(row, self.counts[row.key])
        if rate is None:  # an asynchronous transport lost events: not a figure
            self.results[row.key]["lost"].append(f"round {rnd + 1}: {cpu}")
            log(f"[{self.label}] {row.key}: round {rnd + 1}: {cpu}: round left out")
            return
        self.results[row.key]["rate"].append(rate)
        self.results[row.key]["cpu"].append(cpu)

    def round_log(self, rnd):
        log(f"[{self.label}] round {rnd + 1}/{self.args.rounds}: " + ", ".join(
            f"{r.key} {self.results[r.key]['rate'][-1]:,.0f}/s" for r in self.rows
            if self.live(r) and self.results[r.key]["rate"]))

    def finish(self):
        for r in self.rows:
            self.results[r.key]["raised"] = self.runner.raised.get(r.event, 0)
            self.results[r.key]["failed"] = self.runner.failed.get(r.event, 0)
        self.srv._check_running()
        errors = self.srv.log.errors_since(0)
        if isinstance(self, ReplayRun):  # the subscriber down: expected
            errors = [e for e in errors if "event_stream" not in e]
        if errors:
            log(f"[{self.label}] {len(errors)} ERROR line(s) in the OpenSIPS log, "
                f"e.g.: {errors[0]}")

    def stop(self):
        if self.runner:
            self.runner.close()
        self.srv.stop()  # never unsubscribes: the C module crashes on that
        self.subs.close()


class ReplayRun(ServerRun):
    """A third OpenSIPS, this module only, for the replay rows: its event_stream
    subscriber is a port of the JSON-RPC server bound but not listening (down).
    One measurement: raise --spool-events events, wait until the spool holds
    them all (spool_held), open the port, and time until events_replayed grew
    by as many (get_statistics polled every 10 ms); then close the port again.
    failover_timeout 0 (a failed subscriber is not skipped) and
    spool_retry_interval 50 ms: the drain starts at most ~50 ms after the
    port opens, and that wait is part of the time."""

    RETRY_MS = 50

    def __init__(self, module, rows, args, workdir, reaper, rpc, durable=False):
        self.label = "ours spool" + (" durable" if durable else "")
        self.module = module
        self.rows = [r for r in rows if r.transport == "replay" and r.durable == durable]
        self.args = args
        self.reaper = reaper
        self.rpc = rpc
        self.n = max(1, args.spool_events // args.workers)  # per worker
        extra = (f'modparam("event_virtual", "spool_retry_interval", {self.RETRY_MS})\n'
                 f'modparam("event_virtual", "spool_max_memory", "{args.spool_memory}")\n')
        self.srv = BenchOpenSips(workdir, module, self.rows, args, rabbitmq=False,
                                 failover_timeout=0, extra=extra,
                                 durable=megabytes(args.spool_memory) if durable else None)
        self.durable = durable
        self.restarts = []  # seconds from the stop to MI answering again
        self.socks = {}
        self.subs = Subscribers(workdir, rpc, None)
        self.results = {r.key: {"rate": [], "cpu": [], "shm": None, "error": None,
                                "lost": []} for r in self.rows}
        self.runner = None
        self.counts = {}
        self.ports = {}
        self.dead = None

    def start(self):
        log(f"[{self.label}] starting OpenSIPS with {self.module} (failover_timeout 0, "
            f"spool_retry_interval {self.RETRY_MS})")
        self.srv.start()
        self.reaper.tell("pgid", self.srv.proc.pid)
        for r in self.rows:
            port = self.rpc.reserve()
            self.ports[r.key] = port
            size = max(1000, 2 * self.n * self.args.workers)
            used0 = self.srv.shm_used()
            self.socks[r.key] = virtual(r.policy.format(n=size), f"tcp:127.0.0.1:{port}")
            self.srv.subscribe(r.event, self.socks[r.key])
            self.results[r.key]["shm"] = self.srv.shm_used() - used0
        self.runner = Runner(self.srv, self.subs, self.args.workers, ours=True)

    def _wait(self, what, cond, stall=10.0):
        """Poll the statistics every 10 ms until cond(stats); (stats, None) or
        (stats, why) when nothing moved for `stall` seconds."""
        last, t_last = None, time.monotonic()
        while True:
            s = self.srv.virtual_stats()
            if cond(s):
                return s, None
            key = (s["spool_held"], s["events_replayed"], s["events_spooled"])
            if key != last:
                last, t_last = key, time.monotonic()
            elif time.monotonic() - t_last > stall:
                return s, f"{what}: stalled at {s}"
            time.sleep(0.01)

    def cycle(self, row, n):
        """(events replayed per second, CPU-µs per event) or (None, why)."""
        total = n * self.args.workers
        port = self.ports[row.key]
        s0 = self.srv.virtual_stats()
        if s0["spool_held"]:
            return None, f"spool_held {s0['spool_held']} before raising"
        self.runner.once(row.event, n)
        s1, why = self._wait("holding", lambda s: s["spool_held"] >= total)
        if why:
            return None, why
        if s1["events_dropped"] != s0["events_dropped"]:
            return None, f"events_dropped +{s1['events_dropped'] - s0['events_dropped']}"
        if self.durable:  # a clean stop and a start: the held events wait
            t_stop = time.perf_counter()
            self.srv.stop_clean()
            self.srv.start()
            self.restarts.append(time.perf_counter() - t_stop)
            self.reaper.tell("pgid", self.srv.proc.pid)
            self.runner.all_pids = self.srv.pids()
            s0 = s1 = self.srv.virtual_stats()
            if s1["restore_waiting"] != total:
                return None, f"restore_waiting {s1['restore_waiting']} of {total} after the start"
        got0 = self.rpc.counts().get(row.event, 0)
        cpu0 = cpu_ns(self.runner.all_pids)
        t0 = time.perf_counter()
        self.rpc.open(port)
        if self.durable:  # the subscription made again claims them
            self.srv.subscribe(row.event, self.socks[row.key])
        try:
            s2, why = self._wait("replaying", lambda s: s["events_replayed"]
                                 - s1["events_replayed"] >= total)
            t1 = time.perf_counter()
            cpu = (cpu_ns(self.runner.all_pids) - cpu0) / 1e9
            got = self.rpc.counts().get(row.event, 0) - got0
        finally:
            self.rpc.close_port(port)
        if why:
            return None, why
        if got != total:
            return None, f"the subscriber got {got} of {total}"
        if s2["events_dropped"] != s0["events_dropped"]:
            return None, f"events_dropped +{s2['events_dropped'] - s0['events_dropped']}"
        if self.durable and s2["restore_dropped"]:
            return None, f"restore_dropped {s2['restore_dropped']}"
        return total / (t1 - t0), cpu * 1e6 / total

    def warm_up(self):
        for r in self.rows:
            rate, why = self.cycle(r, max(2, self.n // 10))
            if rate is None:
                self.results[r.key]["lost"].append(f"warm-up: {why}")
            self.counts[r.key] = self.n

    def measure(self, row, rnd):
        if row not in self.rows or not self.live(row):
            return
        rate, cpu = self.cycle(row, self.counts[row.key])
        if rate is None:
            self.results[row.key]["lost"].append(f"round {rnd + 1}: {cpu}")
            log(f"[{self.label}] {row.key}: round {rnd + 1}: {cpu}: round left out")
            return
        self.results[row.key]["rate"].append(rate)
        self.results[row.key]["cpu"].append(cpu)


def cluster_cfg(node_id, ports):
    """The configuration lines of node `node_id` of a two-node cluster
    (the test harness's evvharness.cluster options, written out)."""
    o = cluster.node_options(node_id, ports)
    out = [f"socket = {s}" for s in o["sockets"]]
    for mod, params in o["extra_modules"].items():
        out.append(f'loadmodule "{mod}.so"')
        out += [f'modparam("{mod}", "{p}", {json.dumps(v)})' for p, v in params.items()]
    out += [f'modparam("event_virtual", "{p}", {v})' for p, v in o["virtual_params"].items()]
    return "\n".join(out) + "\n"


class ClusterRun(ServerRun):
    """The cluster rows, this module only: node 1 of a two-node cluster
    measured as the "ours" server is. Node 2 is up (the same script, no
    subscription), or configured and never started (`peer` "down")."""

    def __init__(self, peer, module, rows, args, workdir, reaper, rpc):
        super().__init__(f"ours cluster, peer {peer}", module, [], args, workdir, reaper,
                         rpc, None)
        self.peer_up = peer == "up"
        self.rows = [r for r in rows if r.cluster == peer]
        self.results = {r.key: {"rate": [], "cpu": [], "shm": None, "error": None,
                                "lost": []} for r in self.rows}
        ports = cluster.ports(2)
        self.srv = BenchOpenSips(Path(workdir) / "a", module, self.rows, args, rabbitmq=False,
                                 extra=cluster_cfg(1, ports))
        self.peer = BenchOpenSips(Path(workdir) / "b", module, self.rows, args,
                                  rabbitmq=False, extra=cluster_cfg(2, ports))

    def start(self):
        if self.peer_up:
            log(f"[{self.label}] starting node 2 of the cluster")
            self.peer.start()
            self.reaper.tell("pgid", self.peer.proc.pid)
        super().start()
        if self.peer_up:
            cluster.wait_up(self.srv, 2)

    def finish(self):
        super().finish()
        sent = self.srv.statistics("event_virtual").get("cluster_sent")
        if sent and self.peer_up:
            log(f"[{self.label}] {sent} cluster packet(s) sent: a subscriber failed")

    def stop(self):
        super().stop()
        self.peer.stop()


LOAD_SEEN = []  # 1-minute load average after each round


def guarded(run, what, *a):
    """Run one step of a server; a server that dies (the C module crashes
    now and then) or stops answering is reported and left out, the other
    one goes on."""
    if run.dead:
        return
    try:
        getattr(run, what)(*a)
    except (AssertionError, SystemExit) as e:  # the harness's ServerDied, no reply
        lines = str(e).splitlines()
        crash = [l for l in lines if "segfault" in l or "CRITICAL" in l]
        run.dead = f"{what}: {(crash or lines or ['?'])[0]}"
        log(f"[{run.label}] server lost during {what}: {lines[:2]}; its remaining rows "
            f"are left out")


def run_all(runs, rows, args):
    """Both servers run at once; every round measures each row (in rotating
    order) on one server then on the other (alternating which goes first),
    so that both see the same load."""
    for run in runs:
        run.start()
    for run in runs:
        guarded(run, "warm_up")
    for rnd in range(args.rounds):
        k = rnd % len(rows)
        for i, r in enumerate(rows[k:] + rows[:k]):
            order = runs if (rnd + i) % 2 == 0 else runs[::-1]
            for run in order:
                guarded(run, "measure", r, rnd)
        for run in runs:
            if not run.dead:
                run.round_log(rnd)
        LOAD_SEEN.append(float(loadavg().split()[0]))
    for run in runs:
        guarded(run, "finish")


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def med(values, stat):
    if not values:
        return None
    return max(values) if stat == "best" else statistics.median(values)


def fmt_rate(v):
    return "-" if v is None else f"{v:,.0f}"


def bang(res):
    """A mark on a rate when more than 1% of its raises returned an error."""
    return " !" if res.get("failed", 0) > 0.01 * max(res.get("raised", 0), 1) else ""


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}"


def ratio(res, row, stat, field):
    """The row's figure over its ideal (base, or base / share)."""
    if not row.base or row.base not in res:
        return None
    a, b = med(res[row.key][field], stat), med(res[row.base][field], stat)
    if a is None or b is None:
        return None
    if field == "cpu" and row.transport in ASYNC:
        a, b = 1 / a, 1 / b  # CPU-us per event: lower is better
    return a / (b / row.share)


def build_tables(rows, ours, c, stat):
    """{title: rows of cells} for the report."""
    tables = {}
    for group, is_async in [(g, a) for g in GROUPS for a in (False, True)]:
        grows = [r for r in rows if r.group == group and (r.transport in ASYNC) == is_async]
        if not grows:
            continue
        unit = "events/s" if is_async else "raises/s"
        cunit = "CPU-µs/event" if is_async else "raises/CPU-s"
        head = ["row", "vs", f"ours {unit}", "ours ratio", f"ours {cunit}", "CPU ratio"]
        if c:
            head += [f"C {unit}", "C ratio", "C CPU ratio", "ours / C"]
        head += ["target", "met (wall, CPU)"]
        table = [head]
        for r in grows:
            o = ours[r.key]
            orate, ocpu = med(o["rate"], stat), med(o["cpu"], stat)
            vs = "" if not r.base else (BY_KEY[r.base].label.split(",")[0]
                                        + (f" / {r.share}" if r.share > 1 else ""))
            orat = ratio(ours, r, stat, "rate")
            cells = [r.label, vs, (fmt_rate(orate) + bang(o)) if orate else "n/a",
                     fmt_ratio(orat), (f"{ocpu:,.1f}" if is_async else fmt_rate(ocpu))
                     if ocpu else "-", fmt_ratio(ratio(ours, r, stat, "cpu"))]
            if c:
                cc = c[r.key]
                crate = med(cc["rate"], stat)
                cells += [(fmt_rate(crate) + bang(cc)) if crate else "n/a",
                          fmt_ratio(ratio(c, r, stat, "rate")),
                          fmt_ratio(ratio(c, r, stat, "cpu")),
                          fmt_ratio(orate / crate if orate and crate else None)]
            if r.target is None:
                cells += ["", ""]
            else:
                crat = ratio(ours, r, stat, "cpu")
                cells += [f"≥ {r.target}", ", ".join(
                    "-" if x is None else ("yes" if x >= r.target else "NO")
                    for x in (orat, crat))]
            table.append(cells)
        tables[group if group not in ("spool", "durable")
               else f"{group}_{'replay' if is_async else 'empty'}"] = table
    return tables


def shm_table(rows, ours, c):
    """Shared memory each subscription took (shmem:used_size before/after)."""
    head = ["subscription", "ours bytes"] + (["C bytes"] if c else [])
    t = [head]
    for r in rows:
        t.append([r.label, fmt_rate(ours[r.key]["shm"])]
                 + ([fmt_rate(c[r.key]["shm"])] if c else []))
    return t


def shm_derived(res):
    """Per subscriber (slope x100 -> x1000) and per virtual subscription
    (x3 minus three subscribers), from one run's results."""
    out = {}
    for pol, k3, k100, k1000 in (("ROUND-ROBIN", "RR_N", "RR_100", "RR_1000"),
                                 ("FAILOVER", "FO_N", "FO_100", "FO_1000")):
        s3, s100, s1000 = (res.get(k, {}).get("shm") for k in (k3, k100, k1000))
        if s100 is not None and s1000 is not None:
            per = (s1000 - s100) / 900
            out[pol] = (per, None if s3 is None else s3 - 3 * per)
    return out


def format_plain(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + \
            [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows):
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(rows[0]) - 2)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def opensips_version():
    try:
        out = subprocess.run([str(OPENSIPS_SRC / "opensips"), "-V"],
                             capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].replace("version: ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


TITLES = {
    "sync": "Synchronous delivery (UDP subscribers bound, never read)",
    "scale": "Long lists and a dead subscriber (UDP, no params)",
    "async": "Asynchronous delivery: event_stream, reliable mode (local JSON-RPC server)",
    "rabbitmq": "Asynchronous delivery: event_rabbitmq (local broker)",
    "spool_empty": "Spool on and empty (UDP subscribers never fail), against no spool",
    "cluster": "Cluster on (node 1 of two; subscribers healthy, the other node up; or one "
               "subscriber dead, the other node down), against no cluster",
    "spool_replay": "Spool replay: a full FAILOVER SPOOL queue drained into its event_stream "
                    "subscriber when it comes back (events/s), against direct event_stream",
    "durable_empty": "Restart persistency on, spool on and empty (UDP subscribers never fail), "
                     "against it off",
    "durable_replay": "Replay after a restart: the held events of a clean stop, from the "
                      "subscription made again until the last is replayed (events/s), against "
                      "the replay without a restart",
}


def report(args, rows, ours, c, facts, notes):
    tables = build_tables(rows, ours, c, args.stat)
    fmt = format_markdown if args.markdown else format_plain
    out = []
    for group, t in tables.items():
        out.append(f"{'### ' if args.markdown else ''}{TITLES[group]}\n")
        out.append(fmt(t))
        out.append("")
    out.append(f"{'### ' if args.markdown else ''}Shared memory per subscription "
               f"(shmem:used_size after - before subscribing)\n")
    out.append(fmt(shm_table(rows, ours, c)))
    for name, res in (("ours", ours), ("C", c)):
        for pol, (per, fixed) in shm_derived(res or {}).items():
            out.append(f"{'- ' if args.markdown else ''}{name} {pol}: {per:,.0f} bytes per "
                       f"subscriber (x100 -> x1000, with the transport's socket)"
                       + ("" if fixed is None else f", {fixed:,.0f} bytes per virtual "
                          f"subscription (x3 - 3 subscribers)"))
    out.append("")
    for k, v in facts:
        if args.markdown:
            out.append(f"- {k}: {'`' + v + '`' if k == 'command' else v}")
        else:
            out.append(f"{k + ':':13} {v}")
    for key, base in DERIVED:
        if key not in BY_KEY or key not in ours or base not in ours:
            continue
        r = BY_KEY[key]
        parts = []
        for name, res in (("ours", ours), ("C", c)):
            if not res:
                continue
            a, b = med(res[key]["rate"], args.stat), med(res[base]["rate"], args.stat)
            ca, cb = med(res[key]["cpu"], args.stat), med(res[base]["cpu"], args.stat)
            if a and b:
                parts.append(f"{name} {a / b:.2f} (CPU {cb / ca:.2f})")
        if parts:
            out.append(f"{'- ' if args.markdown else ''}{r.label.split(',')[0]} / "
                       f"{BY_KEY[base].label.split(',')[0]}: " + ", ".join(parts))
    for n in notes:
        out.append(f"{'- ' if args.markdown else ''}note: {n}")
    print("\n".join(out))


# --------------------------------------------------------------------------

def main():
    if sys.argv[1:] == ["--reaper"]:
        reaper_main()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--only", default=",".join(GROUPS),
                    help=f"row groups, comma separated: {','.join(GROUPS)} (default all; "
                         f"rows they compare to come along)")
    ap.add_argument("--workers", type=int, default=2,
                    help="OpenSIPS UDP workers, one raise loop each (default 2)")
    ap.add_argument("--seconds", type=float, default=0.25,
                    help="length of one synchronous measurement; the raise count "
                         "per row is sized from the warm-up (default 0.25)")
    ap.add_argument("--async-events", type=int, default=1000,
                    help="events per worker per asynchronous measurement (default 1000)")
    ap.add_argument("--spool-events", type=int, default=5000,
                    help="events held, then replayed, per spool replay measurement "
                         "(default 5000)")
    ap.add_argument("--spool-memory", default="12M",
                    help="spool_max_memory of the replay OpenSIPS (default 12M)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds, rows interleaved in each (default 5)")
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="figure over the rounds shown in the tables (default median)")
    ap.add_argument("--log-level", type=int, default=1,
                    help="OpenSIPS log_level (default 1: errors only)")
    ap.add_argument("--no-c", action="store_true", help="skip the C module run")
    ap.add_argument("--markdown", action="store_true",
                    help="print the report as Markdown (to paste into docs)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder (cfg, OpenSIPS logs)")
    args = ap.parse_args()
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups:
        ap.error(f"--only: unknown group(s) {bad}; choose from {','.join(GROUPS)}")
    if args.workers < 1 or args.rounds < 1 or args.async_events < 1 or args.seconds <= 0:
        ap.error("--workers, --rounds, --async-events and --seconds must be > 0")
    if not EVV_MODULE.is_file():
        raise SystemExit(f"bench: module under test {EVV_MODULE} not found: run `make` "
                         f"or set EVV_MODULE")

    # SIGINT too: a shell without job control starts background commands
    # with SIGINT ignored, and Python then keeps it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    cmd = (f"OPENSIPS_SRC={OPENSIPS_SRC} EVV_MODULE={EVV_MODULE} "
           f"{shlex.join([Path(sys.executable).name] + sys.argv)}")
    notes = []
    reaper = Reaper()
    workdir = Path(tempfile.mkdtemp(prefix="evv-bench-"))
    if not args.keep:
        reaper.tell("dir", workdir)
    load_before = loadavg()
    t_start = time.monotonic()
    rpc = broker = None
    ours = c = None
    try:
        rows = select_rows(groups)
        if "rabbitmq" in groups:
            broker = Broker(reaper)
            try:
                log("starting a RabbitMQ broker")
                broker.start()
            except Exception as e:
                notes.append(f"rabbitmq rows skipped: {str(e).splitlines()[0]}")
                log(f"bench: {notes[-1]}")
                broker.close()
                broker = None
                rows = [r for r in rows if r.transport != "rmq"]
        if any(r.transport in ("stream", "replay") for r in rows):
            rpc = RpcServer(reaper)
        runs = [ServerRun("ours", EVV_MODULE.resolve(), rows, args, workdir / "ours",
                          reaper, rpc, broker)]
        if any(r.durable and r.transport != "replay" for r in rows):
            runs.append(ServerRun("ours durable", EVV_MODULE.resolve(), rows, args,
                                  workdir / "ours-durable", reaper, rpc, None, durable=True))
        for durable in (False, True):
            if any(r.transport == "replay" and r.durable == durable for r in rows):
                runs.append(ReplayRun(EVV_MODULE.resolve(), rows, args, workdir / (
                    "ours-spool" + ("-durable" if durable else "")), reaper, rpc, durable))
        for peer in ("up", "down"):
            if any(r.cluster == peer for r in rows):
                runs.append(ClusterRun(peer, EVV_MODULE.resolve(), rows, args,
                                       workdir / f"ours-cluster-{peer}", reaper, rpc))
        if args.no_c:
            c_note = "C module run skipped (--no-c)"
        elif C_MODULE.is_file():
            runs.append(ServerRun("C", C_MODULE, rows, args, workdir / "c", reaper, rpc,
                                  broker))
            c_note = f"{C_MODULE} (a second OpenSIPS, up at the same time, measured in turn)"
        else:
            c_note = f"not built at {C_MODULE}: no C columns"
        try:
            run_all(runs, rows, args)
        finally:
            for run in runs:
                run.stop()
        ours = runs[0].results
        for run in runs[1:]:
            if run.label.startswith("ours"):  # the rows it measured
                ours.update({r.key: run.results[r.key] for r in run.rows})
            if getattr(run, "restarts", None):
                notes.append(f"{run.label}: a clean stop and a start with "
                             f"{args.spool_events} events held took "
                             f"{statistics.median(run.restarts):.2f} s (median of "
                             f"{len(run.restarts)}, until MI answers)")
        c = next((run.results for run in runs if run.label == "C"), None)
        for run in runs:
            if run.dead:
                notes.append(f"the {run.label} OpenSIPS was lost ({run.dead}); rows not "
                             f"measured by then show n/a or fewer rounds")
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"bench: interrupted ({e or 'Ctrl-C'}), stopping everything")
        raise SystemExit(130)
    finally:
        for thing in (rpc, broker):
            if thing is not None:
                thing.close()
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        reaper.close()
    total = time.monotonic() - t_start
    for res, name in ((ours, "ours"), (c, "C")):
        for r in rows:
            if res and res[r.key]["error"]:
                notes.append(f"{name} {r.label}: {res[r.key]['error']}")
            failed, raised = res[r.key].get("failed", 0) if res else 0, \
                res[r.key].get("raised", 0) if res else 0
            if failed:
                notes.append(f"{name} {r.label}: raise_event returned an error for {failed:,} "
                             f"of {raised:,} raises (rates marked !)")
            if res and res[r.key]["lost"]:
                lost = res[r.key]["lost"]
                notes.append(f"{name} {r.label}: {len(lost)} measurement(s) left out, "
                             f"deliveries not as raised ({'; '.join(lost)})")

    facts = [
        ("machine", f"nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
                    f"{platform.system()} {platform.release()}"),
        ("load average", f"{load_before} before, {loadavg()} after; 1-minute load after "
                         f"each round: min {min(LOAD_SEEN, default=0):.2f}, median "
                         f"{statistics.median(LOAD_SEEN or [0]):.2f}, max "
                         f"{max(LOAD_SEEN, default=0):.2f} (the bench's own 2 workers "
                         f"count for up to 2)"),
        ("OpenSIPS", f"{opensips_version()} ({OPENSIPS_SRC})"),
        ("module", str(EVV_MODULE.resolve())),
        ("C module", c_note),
        ("setting", f"{args.workers} UDP worker(s); synchronous rows ~{args.seconds} s per "
                    f"measurement, asynchronous rows {args.async_events} events per worker; "
                    f"{args.rounds} rounds, rows interleaved, {args.stat} shown; log_level "
                    f"{args.log_level}; failover_timeout {FAILOVER_TIMEOUT}"
                    + (f"; spool replay: {args.spool_events} events per measurement, "
                       f"spool_max_memory {args.spool_memory}, failover_timeout 0, "
                       f"spool_retry_interval {ReplayRun.RETRY_MS} ms"
                       if any(r.transport == "replay" for r in rows) else "")
                    + (f"; durable: restart_persistency 1 (restart_persistency_size 2 x "
                       f"spool_max_memory + 4 MB), spool_max_memory {ServerRun.DURABLE_MB}M "
                       f"for the empty rows" if any(r.durable for r in rows) else "")),
        ("command", cmd),
        ("took", f"{total:.0f} s"),
    ]
    report(args, rows, ours, c, facts, notes)


if __name__ == "__main__":
    main()
