"""One OpenSIPS process group with a generated configuration: its log, MI,
the SIP requests whose script raises events from the worker processes."""

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from . import env
from .mi import MIClient, MIError, ServerDied
from .processes import family, kill_family, spawn, stop_group
from .sip import sip_request
from .util import DEFAULT_TIMEOUT, free_port

# event names the generated script can raise (the core publishes an event
# when the script that raises it is parsed; MI raise_event needs that)
EVENT_POOL = [f"E_T{i}" for i in range(40)]

# the statistics the module must show under event_virtual:
VIRTUAL_STATS = ("events", "events_delivered", "events_failed", "events_incomplete",
                 "failovers", "events_unkeyed")
# ... and the spool's (issue 10), there whether a spool is configured or not
SPOOL_STATS = ("events_spooled", "events_replayed", "events_dropped", "spool_held",
               "spool_memory", "events_restored", "restore_waiting", "restore_dropped",
               "events_unpersisted")
# ... and the cluster's (issue 18), there whether cluster_id is set or not
CLUSTER_STATS = ("cluster_sent", "cluster_received", "cluster_dropped")

# A request carrying "X-Event: E_Tn" raises E_Tn X-Count times (default 1)
# in the worker that handles it, with params tag (X-Tag), i (loop index)
# and pid ($pp).
SCRIPT = """
route {{
    if ($hdr(X-Event) == NULL)
        exit;
    $var(n) = 1;
    if ($hdr(X-Count) != NULL)
        $var(n) = $(hdr(X-Count){{s.int}});
    $var(i) = 0;
    while ($var(i) < $var(n)) {{
        $avp(evk) := "tag";
        $avp(evk) = "i";
        $avp(evk) = "pid";
        $avp(evv) := $hdr(X-Tag);
        $avp(evv) = $var(i);
        $avp(evv) = $pp;
        route(raise);
        $var(i) = $var(i) + 1;
    }}
    exit;
}}

route[raise] {{
    switch ($hdr(X-Event)) {{
{raise_cases}
    }}
}}
{startup_route}"""


def crash_lines(log_text):
    return [l for l in log_text.splitlines()
            if re.search(r"segfault|exited by a signal|terminated by signal|"
                         r"core dumped|CRITICAL:", l)]


class Log:
    def __init__(self, path):
        self.path = Path(path)

    def text(self):
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self):
        """Position to count new lines from."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines_since(self, mark=0):
        with open(self.path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace").splitlines()

    def errors_since(self, mark=0, token=None, module=None):
        """ERROR lines since mark, optionally containing token / from module."""
        return [line for line in self.lines_since(mark)
                if ("ERROR:" in line or "CRITICAL:" in line)
                and (not module or f":{module}:" in line)
                and (token is None or token in line)]

    def tail(self, n=40):
        return "\n".join(self.text().splitlines()[-n:])


class OpenSips:
    """One OpenSIPS process group with a generated configuration.

    Options (the keywords of @pytest.mark.server):
      failover_timeout  modparam("event_virtual", "failover_timeout", s)
      stream_timeout    modparam("event_stream", "timeout", ms): how long
                        event_stream waits for a JSON-RPC answer (checked
                        about once a second, so a timeout shows within
                        ms + ~1 s)
      extra_modules     {module: {param: value}}, loaded before the module
                        under test (their .so must be built)
      virtual_params    {param: value}: more modparams of the module under
                        test (the spool's)
      core_params       {param: value}: more core parameters (e.g.
                        restart_persistency_cache_file); a str is quoted
      startup_subscriptions  [(event, socket)]: subscribe_event() calls of
                        a startup_route (the events: of EVENT_POOL)
      sockets           more listening sockets, as written (a cluster node's
                        bin: socket, evvharness.cluster)
      startup_route     the body of a startup_route (subscriptions made at
                        start, before any peer can talk to the server)
      workers, log_level

    A server can be stopped and started again with the same configuration
    (restart(), or stop_clean() / kill_all() then start()): the same log,
    appended to (start_mark: where the last start began), the same ports
    when they are still free.
    """

    def __init__(self, workdir, failover_timeout=None, workers=2, log_level=3,
                 stream_timeout=None, extra_modules=(), module=None, virtual_params=None,
                 core_params=None, startup_subscriptions=(), sockets=(), startup_route=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.failover_timeout = failover_timeout
        self.stream_timeout = stream_timeout
        self.extra_modules = {m: dict(p) for m, p in dict(extra_modules).items()}
        self.virtual_params = dict(virtual_params or {})
        self.core_params = dict(core_params or {})
        self.startup_subscriptions = list(startup_subscriptions)
        self.sockets = list(sockets)
        self.startup_route = startup_route
        self.workers = workers
        self.log_level = log_level
        self.module = Path(module or env.EVV_MODULE)
        self.proc = None
        self.mi_client = None
        self.log = Log(self.workdir / "opensips.log")
        self._events = iter(EVENT_POOL)
        self.sip_port = self.mi_port = None
        self.start_mark = 0
        self._sip_sock = None
        self._sip_seq = 0

    # ---- configuration ----------------------------------------------------

    def core(self):
        """{core parameter: value as written} of the configuration."""
        return {"log_level": self.log_level, "stderror_enabled": "yes",
                "syslog_enabled": "no", "disable_core_dump": "yes",
                "udp_workers": self.workers, "socket": f"udp:127.0.0.1:{self.sip_port}",
                "mpath": f'"{env.OPENSIPS_SRC}/modules/"',
                **{k: v if isinstance(v, int) else json.dumps(str(v))
                   for k, v in self.core_params.items()}}

    def modules(self):
        """[(module .so, {param: value})] in load order: the transports
        first, the module under test last."""
        stream = {"reliable_mode": 1}
        if self.stream_timeout is not None:
            stream["timeout"] = int(self.stream_timeout)
        virtual = dict(self.virtual_params)
        if self.failover_timeout is not None:
            virtual["failover_timeout"] = self.failover_timeout
        return [("proto_udp.so", {}),
                ("mi_datagram.so", {"socket_name": f"udp:127.0.0.1:{self.mi_port}"}),
                ("event_datagram.so", {}), ("event_flatstore.so", {}),
                ("event_stream.so", stream),
                *((f"{m}.so", p) for m, p in self.extra_modules.items()),
                (str(self.module), virtual)]

    def script(self):
        startup = "".join(f"    subscribe_event({json.dumps(e)}, {json.dumps(s)});\n"
                          for e, s in self.startup_subscriptions)
        startup += f"{self.startup_route}\n" if self.startup_route else ""
        return SCRIPT.format(raise_cases="\n".join(
            f'        case "{e}": raise_event("{e}", $avp(evk), $avp(evv)); break;'
            for e in EVENT_POOL),
            startup_route=f"\nstartup_route {{\n{startup}}}\n" if startup else "")

    def config(self):
        """opensips.cfg: core(), modules() with their parameters, script()."""
        out = [f"{k} = {v}" for k, v in self.core().items()]
        out += [f"socket = {s}" for s in self.sockets]
        for so, params in self.modules():
            out.append(f'loadmodule "{so}"')
            name = Path(so).name.removesuffix(".so")
            for p, v in params.items():
                v = v if isinstance(v, int) else json.dumps(str(v))
                out.append(f'modparam("{name}", "{p}", {v})')
        return "\n".join(out) + "\n" + self.script()

    def _write_cfg(self):
        self.cfg_path = self.workdir / "opensips.cfg"
        self.cfg_path.write_text(self.config())

    # ---- life cycle -------------------------------------------------------

    def start(self, attempts=3):
        """Start (again: the ports of the last start first, if they are
        still free); fails the test when OpenSIPS does not come up."""
        if not self.try_start(attempts):
            pytest.fail(f"OpenSIPS did not start ({self.module}); log {self.log.path}:\n"
                        f"{self.log.tail(60)}", pytrace=False)
        return self

    def try_start(self, attempts=3):
        """start(), but True or False: False when OpenSIPS did not come up
        (its process group is then gone; start_mark: where its log began)."""
        env.check_prerequisites(self.module, self.extra_modules)
        assert self.proc is None, "start: this server runs"
        for attempt in range(attempts):
            if attempt or self.sip_port is None:
                self.sip_port = free_port()
                self.mi_port = free_port()
            self._write_cfg()
            self.start_mark = self.log.mark()
            if self._start_once():
                return True
            self.stop()
            if "Address already in use" not in "\n".join(self.log.lines_since(self.start_mark)):
                break
        return False

    def _start_once(self):
        self.proc = spawn([env.OPENSIPS_SRC / "opensips", "-F", "-f", self.cfg_path],
                          self.log.path, cwd=self.workdir)
        self.mi_client = MIClient(self.mi_port, self._check_running)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.mi_client.call("version", timeout=0.2)
                return True
            except (TimeoutError, OSError, ServerDied):
                continue
        return False

    def stop(self):
        self.mi_client = None
        if self._sip_sock:
            self._sip_sock.close()
            self._sip_sock = None
        if self.proc:
            stop_group(self.proc)
            self.proc = None

    def stop_clean(self, timeout=15.0):
        """A clean stop, as an operator's `kill <pid>`: SIGTERM to the main
        process only (it stops the others and runs the modules' destroy);
        fails unless every process is gone within timeout and the main
        one exited with status 0."""
        assert self.running(), "stop_clean: the server is not running"
        self.mi_client = None
        proc, self.proc = self.proc, None
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (proc.poll() is None or family(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = family(proc.pid)
        if proc.poll() is None or left:
            kill_family(proc)
            raise AssertionError(f"OpenSIPS did not stop within {timeout}s of SIGTERM "
                                 f"(processes left: {sorted(left)}); log {self.log.path}:\n"
                                 f"{self.log.tail(30)}")
        assert proc.returncode == 0, (
            f"OpenSIPS exited with status {proc.returncode} on SIGTERM; log "
            f"{self.log.path}:\n{self.log.tail(30)}")

    def kill_all(self):
        """A crash: SIGKILL to every OpenSIPS process of this server (the
        main one and all it forked), all at once. Returns the pids killed."""
        assert self.running(), "kill_all: the server is not running"
        self.mi_client = None
        proc, self.proc = self.proc, None
        return kill_family(proc)

    def restart(self, how="term"):
        """stop_clean() ("term") or kill_all() ("kill"), then start() with
        the same configuration (and ports, if still free)."""
        assert how in ("term", "kill"), how
        self.stop_clean() if how == "term" else self.kill_all()
        return self.start()

    def pids(self):
        """Every live process of this OpenSIPS."""
        return sorted(family(self.proc.pid)) if self.proc else []

    # ---- health -----------------------------------------------------------

    def _check_running(self):
        if not self.running():
            crashes = crash_lines(self.log.text())
            raise ServerDied(
                f"OpenSIPS died (exit status {self.proc.returncode if self.proc else None})"
                + ("; crash:\n" + "\n".join(crashes) if crashes else "")
                + f"\nlog {self.log.path}:\n{self.log.tail(30)}")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def alive(self):
        """The main process runs and MI answers."""
        if not self.running():
            return False
        try:
            self.mi("version", timeout=3)
            return True
        except (TimeoutError, MIError, OSError, ServerDied):
            return False

    def assert_alive(self, context=""):
        if not self.alive():
            raise AssertionError(
                f"OpenSIPS is dead or does not answer MI{(' ' + context) if context else ''}"
                f"; log {self.log.path}:\n{self.log.tail(30)}")

    # ---- MI ---------------------------------------------------------------

    def mi(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        return self.mi_client.call(method, params, timeout=timeout)

    def subscribe(self, event, sock, expire=3600):
        return self.mi("event_subscribe", {"event": event, "socket": sock, "expire": expire})

    def unsubscribe(self, event, sock):
        return self.subscribe(event, sock, expire=0)

    def raise_event(self, event, params=None):
        p = {"event": event}
        if params is not None:
            p["params"] = json.dumps(params)  # MI raise_event takes a JSON string
        return self.mi("raise_event", p)

    def subscribers_list(self, event=None):
        return self.mi("subscribers_list", {"event": event} if event else None)

    def subscribers(self, event):
        """Printed sockets subscribed to event (the listing also removes expired ones)."""
        res = self.subscribers_list(event)
        return [s["socket"] for s in res.get("Event", {}).get("Subscribers", [])]

    def statistics(self, group):
        """get_statistics GROUP: as {name without the group: int}."""
        res = self.mi("get_statistics", {"statistics": [f"{group}:"]})
        return {k.split(":", 1)[1]: int(v) for k, v in res.items()
                if k.startswith(f"{group}:")}

    def shm_used(self):
        # "shmem:used_size" as one name gives {} on 3.6/4.0; ask for the group
        return self.statistics("shmem")["used_size"]

    def virtual_stats(self):
        """event_virtual:* statistics as {short_name: int}; VIRTUAL_STATS must be there."""
        res = self.statistics("event_virtual")
        missing = [s for s in VIRTUAL_STATS if s not in res]
        assert not missing, f"statistics missing from get_statistics event_virtual: {missing}: {res}"
        return res

    def virtual_list(self, event=None):
        """event_virtual_list (for one event, or all): its list of subscriptions."""
        res = self.mi("event_virtual_list", {"event": event} if event else None)
        assert isinstance(res, dict) and isinstance(res.get("Subscriptions"), list), res
        return res["Subscriptions"]

    def new_event(self):
        """An event name no other test on this server uses."""
        try:
            return next(self._events)
        except StopIteration:
            raise AssertionError("event pool exhausted: raise EVENT_POOL size")

    # ---- SIP: raise from the script in worker processes -------------------

    def send_sip(self, event, count=1, tag="x"):
        if self._sip_sock is None:
            self._sip_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sip_sock.bind(("127.0.0.1", 0))
        self._sip_seq += 1
        self._sip_sock.sendto(
            sip_request(self.sip_port, self._sip_sock.getsockname()[1], self._sip_seq,
                        event, count, tag),
            ("127.0.0.1", self.sip_port))


def stats_delta(before, after):
    """How far the VIRTUAL_STATS moved from before to after (virtual_stats())."""
    return {k: after[k] - before[k] for k in VIRTUAL_STATS}
