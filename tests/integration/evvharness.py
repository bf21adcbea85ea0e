"""Helpers for the event_virtual integration tests.

Everything here talks to a real OpenSIPS over loopback only:

* ``OpenSips``  - writes an opensips.cfg in a temp dir, runs ``opensips -F`` in
  its own process group, talks MI (JSON-RPC 2.0 over UDP, mi_datagram) and
  sends SIP requests whose script raises events from the worker processes;
* receivers     - what event_datagram (UDP / unix datagram) and
  event_flatstore (files) deliver, collected by background threads;
* ``wait_until`` - every wait is a condition with a deadline.
"""

import ctypes
import json
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent

OPENSIPS_SRC = Path(os.environ.get("OPENSIPS_SRC", "/usr/local/src/opensips"))
EVV_MODULE = Path(os.environ.get("EVV_MODULE", str(REPO_ROOT / "event_virtual.so")))

# event names the generated script can raise (the core publishes an event
# when the script that raises it is parsed; MI raise_event needs that)
EVENT_POOL = [f"E_T{i}" for i in range(40)]

DEFAULT_TIMEOUT = 5.0

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


# --------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------

def wait_until(cond, timeout=DEFAULT_TIMEOUT, what="condition", interval=0.005):
    """Poll cond() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def die_with_parent():
    """For preexec_fn: a test run killed before its teardown (a timeout, ^C
    twice) must not leave its servers running; they stop with it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_prerequisites(extra_modules=()):
    """Fail (never skip) with a message that says what to build or set."""
    binary = OPENSIPS_SRC / "opensips"
    problems = []
    if not binary.is_file():
        problems.append(
            f"OpenSIPS binary {binary} not found: set OPENSIPS_SRC to a built "
            f"OpenSIPS source tree (run `make` there)")
    for mod in ("event_datagram", "event_flatstore", "event_stream", "mi_datagram",
                *extra_modules):
        so = OPENSIPS_SRC / "modules" / mod / f"{mod}.so"
        if binary.is_file() and not so.is_file():
            problems.append(f"{so} not found: build it (`make modules module={mod}` in "
                            f"{OPENSIPS_SRC}; event_rabbitmq needs librabbitmq-dev)")
    if not EVV_MODULE.is_file():
        problems.append(
            f"module under test {EVV_MODULE} not found: run `make` in {REPO_ROOT} "
            f"or set EVV_MODULE to an event_virtual.so")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------
# MI over UDP (mi_datagram, JSON-RPC 2.0)
# --------------------------------------------------------------------------

class MIError(Exception):
    def __init__(self, method, error):
        self.method = method
        self.error = error  # the JSON-RPC error object
        self.code = error.get("code")
        self.message = error.get("message")
        super().__init__(f"MI {method} failed: {error}")


class ServerDied(AssertionError):
    pass


class MIClient:
    def __init__(self, port, check_alive=None):
        self.check_alive = check_alive or (lambda: None)
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.next_id = 1
        self.lock = threading.Lock()

    def call(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        with self.lock:
            rid = self.next_id
            self.next_id += 1
            req = {"jsonrpc": "2.0", "method": method, "id": rid}
            if params is not None:
                req["params"] = params
            self.sock.sendto(json.dumps(req).encode(), self.addr)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.check_alive()
                    raise TimeoutError(f"no MI answer to {method} within {timeout}s")
                self.sock.settimeout(min(left, 0.2))
                try:
                    data = self.sock.recv(1 << 17)
                except socket.timeout:
                    self.check_alive()
                    continue
                reply = json.loads(data)
                if reply.get("id") != rid:
                    continue  # late answer to an earlier, timed-out request
                if "error" in reply:
                    raise MIError(method, reply["error"])
                return reply.get("result")

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------
# OpenSIPS log
# --------------------------------------------------------------------------

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
        out = []
        for line in self.lines_since(mark):
            if "ERROR:" not in line and "CRITICAL:" not in line:
                continue
            if module and f":{module}:" not in line:
                continue
            if token is not None and token not in line:
                continue
            out.append(line)
        return out

    def tail(self, n=40):
        return "\n".join(self.text().splitlines()[-n:])


# --------------------------------------------------------------------------
# OpenSIPS server
# --------------------------------------------------------------------------

CFG_TEMPLATE = """\
log_level = {log_level}
stderror_enabled = yes
syslog_enabled = no
disable_core_dump = yes
udp_workers = {workers}
socket = udp:127.0.0.1:{sip_port}

mpath = "{mpath}"
loadmodule "proto_udp.so"
loadmodule "mi_datagram.so"
modparam("mi_datagram", "socket_name", "udp:127.0.0.1:{mi_port}")
loadmodule "event_datagram.so"
loadmodule "event_flatstore.so"
loadmodule "event_stream.so"
modparam("event_stream", "reliable_mode", 1)
{transport_params}loadmodule "{module}"
{virtual_params}

# A request carrying "X-Event: E_Tn" raises E_Tn X-Count times (default 1)
# in the worker that handles it, with params tag (X-Tag), i (loop index)
# and pid ($pp).
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
"""


class OpenSips:
    """One OpenSIPS process group with a generated configuration."""

    def __init__(self, workdir, failover_timeout=None, workers=2, log_level=3,
                 stream_timeout=None, extra_modules=(), module=None):
        """stream_timeout: modparam("event_stream", "timeout", ms), how long
        event_stream waits for a JSON-RPC answer before it reports a failure
        (checked about once a second by its sender process, so a timeout
        shows within ms + ~1 s); extra_modules: [(module_name, [(param,
        value), ...]), ...] loaded before the module under test; module:
        another event_virtual.so than EVV_MODULE."""
        self.module = Path(module or EVV_MODULE)
        self.stream_timeout = stream_timeout
        self.extra_modules = list(extra_modules)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.failover_timeout = failover_timeout
        self.workers = workers
        self.log_level = log_level
        self.proc = None
        self.mi_client = None
        self.log = Log(self.workdir / "opensips.log")
        self._events = iter(EVENT_POOL)
        self._sip_sock = None
        self._sip_seq = 0

    # ---- life cycle -------------------------------------------------------

    def _write_cfg(self):
        cases = "\n".join(
            f'        case "{e}": raise_event("{e}", $avp(evk), $avp(evv)); break;'
            for e in EVENT_POOL)
        vparams = ""
        if self.failover_timeout is not None:
            vparams = f'modparam("event_virtual", "failover_timeout", {self.failover_timeout})'
        tparams = []
        if self.stream_timeout is not None:
            tparams.append(f'modparam("event_stream", "timeout", {int(self.stream_timeout)})')
        for mod, params in self.extra_modules:
            tparams.append(f'loadmodule "{mod}.so"')
            for name, value in params:
                v = value if isinstance(value, int) else json.dumps(str(value))
                tparams.append(f'modparam("{mod}", "{name}", {v})')
        cfg = CFG_TEMPLATE.format(
            transport_params="".join(line + "\n" for line in tparams),
            log_level=self.log_level, workers=self.workers,
            sip_port=self.sip_port, mi_port=self.mi_port,
            mpath=f"{OPENSIPS_SRC}/modules/", module=self.module,
            virtual_params=vparams, raise_cases=cases)
        self.cfg_path = self.workdir / "opensips.cfg"
        self.cfg_path.write_text(cfg)

    def start(self, attempts=3):
        check_prerequisites([m for m, _ in self.extra_modules])
        for attempt in range(attempts):
            self.sip_port = free_udp_port()
            self.mi_port = free_udp_port()
            self._write_cfg()
            if self._start_once():
                return self
            self.stop()
            if "Address already in use" not in self.log.text():
                break
        pytest.fail(f"OpenSIPS did not start ({self.module}); log {self.log.path}:\n"
                    f"{self.log.tail(60)}", pytrace=False)

    def _start_once(self):
        def no_core():
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            die_with_parent()

        with open(self.log.path, "ab") as logf:
            self.proc = subprocess.Popen(
                [str(OPENSIPS_SRC / "opensips"), "-F", "-f", str(self.cfg_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True, preexec_fn=no_core)
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
        if self.mi_client:
            self.mi_client.close()
            self.mi_client = None
        if self._sip_sock:
            self._sip_sock.close()
            self._sip_sock = None
        if not self.proc:
            return
        pgid = self.proc.pid  # start_new_session: pgid == pid of opensips
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()
                if not _group_alive(pgid):
                    break
                time.sleep(0.02)
            else:
                continue
            break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

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

    def get_statistics(self, names):
        return self.mi("get_statistics", {"statistics": list(names)})

    def shm_used(self):
        # "shmem:used_size" as one name gives {} on 3.6/4.0; ask for the group
        return self.get_statistics(["shmem:"])["shmem:used_size"]

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
        lport = self._sip_sock.getsockname()[1]
        n = self._sip_seq
        msg = (
            f"OPTIONS sip:evv@127.0.0.1:{self.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK-evv-{os.getpid()}-{n}\r\n"
            f"Max-Forwards: 70\r\n"
            f"From: <sip:tester@127.0.0.1>;tag=evv{n}\r\n"
            f"To: <sip:evv@127.0.0.1>\r\n"
            f"Call-ID: evv-{os.getpid()}-{n}@127.0.0.1\r\n"
            f"CSeq: {n} OPTIONS\r\n"
            f"X-Event: {event}\r\n"
            f"X-Count: {count}\r\n"
            f"X-Tag: {tag}\r\n"
            f"Content-Length: 0\r\n\r\n")
        self._sip_sock.sendto(msg.encode(), ("127.0.0.1", self.sip_port))

    # ---- observability of the module under test -------------------------

    def virtual_stats(self):
        """event_virtual:* statistics as {short_name: int}."""
        res = self.get_statistics(["event_virtual:"])
        return {k.split(":", 1)[1]: int(v) for k, v in res.items()
                if k.startswith("event_virtual:")}

    def virtual_list(self, event):
        """event_virtual_list for one event: its list of subscriptions."""
        return self.mi("event_virtual_list", {"event": event}).get("Subscriptions", [])


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg; look for live members
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# --------------------------------------------------------------------------
# receivers
# --------------------------------------------------------------------------

class Receiver:
    """What one subscriber got, in arrival order: dicts {method, params}."""

    socket = None  # the event socket string, e.g. "udp:127.0.0.1:4000"

    def __init__(self):
        self._events = []
        self._lock = threading.Lock()

    def _add(self, ev):
        with self._lock:
            self._events.append(ev)

    def events(self, event=None):
        with self._lock:
            evs = list(self._events)
        return [e for e in evs if event is None or e["method"] == event]

    def count(self, event=None):
        return len(self.events(event))

    def wait_count(self, n, event=None, timeout=DEFAULT_TIMEOUT):
        wait_until(lambda: self.count(event) >= n, timeout,
                   f"{n} x {event or 'any event'} at {self.socket} (got {self.count(event)})")

    def close(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.socket}>"


class _DatagramReceiver(Receiver):
    def __init__(self, family, address):
        super().__init__()
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.address = address
        self._stop = False
        self._thread = None

    def _start(self):
        self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                msg = json.loads(data)
            except ValueError:
                msg = {"method": None, "raw": data}
            self._add({"method": msg.get("method"), "params": msg.get("params"), "raw": data})

    def close(self):
        self._stop = True
        if self._thread:
            self._thread.join(2)
        self.sock.close()


class UdpReceiver(_DatagramReceiver):
    def __init__(self):
        super().__init__(socket.AF_INET, ("127.0.0.1", 0))
        self._start()
        self.port = self.sock.getsockname()[1]
        self.socket = f"udp:127.0.0.1:{self.port}"


class UnixReceiver(_DatagramReceiver):
    """unix datagram listener; bind=False gives a dead subscriber (nobody
    bound at the path: event_datagram's sendto fails at once) that can be
    brought to life later with bind()."""

    def __init__(self, path, bind=True):
        super().__init__(socket.AF_UNIX, str(path))
        self.path = Path(path)
        self.socket = f"unix:{path}"
        if bind:
            self.bind()

    def bind(self):
        self._start()

    @property
    def bound(self):
        return self._thread is not None

    def close(self):
        super().close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class FlatstoreReceiver(Receiver):
    """event_flatstore writes `EVENT,value1,value2...` lines to a file."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self.socket = f"flatstore:{path}"

    def events(self, event=None):
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        evs = []
        for line in lines:
            fields = line.split(",")
            evs.append({"method": fields[0], "params": fields[1:], "raw": line})
        return [e for e in evs if event is None or e["method"] == event]


class JsonRpcServer(Receiver):
    """event_stream subscriber (`tcp:127.0.0.1:PORT`). In reliable mode
    event_stream sends JSON-RPC requests with an id, back to back on one
    connection, and reports the answer to the raiser asynchronously
    (EVI_ASYNC_STATUS). The answer can be changed at any time: mode "ok" (a result), "error" (an error object) or
    "hold" (no answer now: the request is kept, to be answered later with
    release() - or never, which is a silent server).

    events() is every request that reached the server (an attempt, not
    necessarily a delivery)."""

    def __init__(self, mode="ok"):
        super().__init__()
        self._mode = mode
        self._held = []  # (conn, request)
        self._mlock = threading.Lock()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.lsock.settimeout(0.05)
        self.port = self.lsock.getsockname()[1]
        self.socket = f"tcp:127.0.0.1:{self.port}"
        self._stop = False
        self._conns = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def set_mode(self, mode):
        assert mode in ("ok", "error", "hold")
        with self._mlock:
            self._mode = mode

    def held(self):
        with self._mlock:
            return [req for _, req in self._held]

    def release(self, answer_for=lambda req: "ok", limit=None):
        """Answer the held requests (the first `limit` of them, default all);
        answer_for(request) -> "ok" | "error". Note: event_stream cannot take
        more than a few answers arriving in one read (it then drops the
        connection and fails what is pending on it): release one at a time
        and wait for its effect when that matters."""
        with self._mlock:
            n = len(self._held) if limit is None else limit
            held, self._held = self._held[:n], self._held[n:]
        for conn, req in held:
            self._reply(conn, req, answer_for(req))
        return [req for _, req in held]

    @staticmethod
    def _reply(conn, req, answer):
        if answer == "ok":
            reply = {"jsonrpc": "2.0", "id": req["id"], "result": "OK"}
        else:
            reply = {"jsonrpc": "2.0", "id": req["id"],
                     "error": {"code": -32000, "message": "refused by test"}}
        try:
            conn.sendall(json.dumps(reply).encode())
        except OSError:
            pass

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn):
        decoder = json.JSONDecoder()
        buf = ""
        conn.settimeout(0.05)
        while not self._stop:
            try:
                data = conn.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data.decode()
            while True:
                buf = buf.lstrip()
                try:
                    msg, end = decoder.raw_decode(buf)
                except ValueError:
                    break
                buf = buf[end:]
                self._add({"method": msg.get("method"), "params": msg.get("params"),
                           "raw": msg})
                if "id" not in msg:
                    continue
                with self._mlock:
                    mode = self._mode
                    if mode == "hold":
                        self._held.append((conn, msg))
                if mode != "hold":
                    self._reply(conn, msg, mode)

    def close(self):
        self._stop = True
        for t in self._threads:
            t.join(2)
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self.lsock.close()


class Receivers:
    """Factory for receivers of one test; closes them at teardown."""

    def __init__(self, tmpdir):
        self.dir = Path(tmpdir)
        self.all = []
        self._n = 0

    def _path(self, stem):
        self._n += 1
        return self.dir / f"{stem}{self._n}"

    def udp(self, n=None):
        if n is not None:
            return [self.udp() for _ in range(n)]
        r = UdpReceiver()
        self.all.append(r)
        return r

    def unix(self, bind=True):
        r = UnixReceiver(self._path("u").with_suffix(".sock"), bind=bind)
        self.all.append(r)
        return r

    def dead(self):
        """A subscriber whose raise fails at once (unix path nobody bound)."""
        return self.unix(bind=False)

    def tcp(self, answer="ok"):
        """A JSON-RPC server for event_stream; answer "ok" | "error" | "hold"."""
        r = JsonRpcServer(answer)
        self.all.append(r)
        return r

    def flatstore(self):
        r = FlatstoreReceiver(self._path("f").with_suffix(".log"))
        self.all.append(r)
        return r

    def close(self):
        for r in self.all:
            r.close()


# --------------------------------------------------------------------------
# event helpers
# --------------------------------------------------------------------------

def virtual(policy, *subs):
    return "virtual:" + policy + " " + " ".join(
        s if isinstance(s, str) else s.socket for s in subs)


def seq_of(ev):
    p = ev.get("params")
    if isinstance(p, dict):
        return p.get("seq")
    return None


def who_got(receivers, event, seq):
    """Indexes of receivers that got (event, seq) so far."""
    return [i for i, r in enumerate(receivers)
            if any(seq_of(e) == seq for e in r.events(event))]


def raise_one(srv, event, seq, receivers, copies=1, timeout=DEFAULT_TIMEOUT):
    """Raise event (param seq) over MI and wait until `copies` receivers in
    total got it. Returns the indexes of the receivers that got it.
    Raising one at a time keeps the order: MI hands each raise to some worker."""
    srv.raise_event(event, {"seq": seq})
    return wait_until(
        lambda: (lambda got: got if len(got) >= copies else None)(who_got(receivers, event, seq)),
        timeout, f"{event} seq={seq} to reach {copies} receiver(s) of {receivers}")


def assert_quiet(receivers, expected, event=None, window=0.3):
    """Absence check: over a short window, the counts stay as expected.
    (Loopback datagrams land in the receiver's buffer during the sender's
    sendto(), so anything still to come would be in flight already.)"""
    deadline = time.monotonic() + window
    while True:
        counts = [r.count(event) for r in receivers]
        assert counts == list(expected), (
            f"unexpected deliveries of {event}: got {counts}, expected {list(expected)}")
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def crash_lines(log_text):
    return [l for l in log_text.splitlines()
            if re.search(r"segfault|exited by a signal|terminated by signal|"
                         r"core dumped|CRITICAL:", l)]


# ==========================================================================
# Asynchronous transports (issue "Asynchronous transports"): event_stream
# in reliable mode with a controllable JSON-RPC server, extra transport
# modules (event_rabbitmq) and a throw-away RabbitMQ broker.
# Appended section: nothing above is changed by it.
# ==========================================================================

import pwd as _pwd  # noqa: E402
import shutil as _shutil  # noqa: E402
import tempfile as _tempfile  # noqa: E402


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_tcp_port():
    """A loopback TCP port nobody listens on: a connect is refused at once."""
    return free_tcp_port()


def seqs_of(receiver, event):
    return [seq_of(e) for e in receiver.events(event)]


def assert_each_once(receivers, event, seqs, attempts=()):
    """Every seq in seqs reached exactly one receiver of `receivers` (the
    live ones), exactly once; `attempts` (failing subscribers) saw each seq
    at most once. Returns per-live-receiver counts."""
    seen = {}
    for i, r in enumerate(receivers):
        for s in seqs_of(r, event):
            seen.setdefault(s, []).append(i)
    lost = [s for s in seqs if s not in seen]
    dup = {s: who for s, who in seen.items() if len(who) > 1}
    extra = [s for s in seen if s not in seqs]
    assert not lost and not dup and not extra, (
        f"{event}: lost {lost}, delivered more than once {dup}, unexpected {extra}; "
        f"counts {[r.count(event) for r in receivers]}")
    for r in attempts:
        got = seqs_of(r, event)
        assert len(got) == len(set(got)), f"{r} was tried twice with one event: {sorted(got)}"
    return [r.count(event) for r in receivers]


# --------------------------------------------------------------------------
# RabbitMQ broker (Debian's rabbitmq-server), loopback only, as `rabbitmq`
# --------------------------------------------------------------------------

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class BrokerError(AssertionError):
    pass


class RabbitMQBroker:
    """A throw-away broker: its own node name, ports, data and log dirs (a
    temp dir owned by the rabbitmq user), its own epmd on a free loopback
    port; run as the rabbitmq user in its own process group."""

    START_TIMEOUT = 60.0

    def __init__(self):
        self.proc = None
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
            pw = _pwd.getpwnam("rabbitmq")
        except KeyError:
            raise BrokerError("no `rabbitmq` user: install Debian's rabbitmq-server")
        if os.geteuid() != 0:
            raise BrokerError("starting the broker as the rabbitmq user needs root")
        try:
            import logging
            import pika  # noqa: F401
            # pika logs every refused connect while the broker boots
            logging.getLogger("pika").setLevel(logging.CRITICAL)
        except ImportError:
            raise BrokerError("python module pika missing: pip install -r tests/requirements.txt")
        self.dir = Path(_tempfile.mkdtemp(prefix="evv-rmq-", dir="/tmp"))
        self.amqp_port, self.dist_port, self.epmd_port = (free_tcp_port() for _ in range(3))
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
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                ["runuser", "-u", "rabbitmq", "--", str(RABBITMQ_SERVER)],
                env=self._env(), cwd=self.dir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
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

    def declare(self, queue):
        c = self.connect()
        try:
            c.channel().queue_declare(queue, durable=False, auto_delete=False)
        finally:
            c.close()
        return queue

    def queue_count(self, queue):
        c = self.connect()
        try:
            return c.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            c.close()

    def drain(self, queue):
        """Every message in the queue now, decoded (JSON-RPC notifications)."""
        c = self.connect()
        out = []
        try:
            ch = c.channel()
            while True:
                method, _props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return out
                try:
                    out.append(json.loads(body))
                except ValueError:
                    out.append({"raw": body})
        finally:
            c.close()

    def stop(self):
        if self.proc is not None:
            for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
                deadline = time.monotonic() + grace
                while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not _group_alive(self.proc.pid):
                    break
            self.proc = None
        if self.epmd_port:
            # epmd daemonizes into a session of its own: ask it to stop
            subprocess.run(["epmd", "-kill"], env={
                "PATH": "/usr/sbin:/usr/bin:/bin", "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1"}, capture_output=True, timeout=10)

            def epmd_gone():
                try:
                    socket.create_connection(("127.0.0.1", self.epmd_port), 0.2).close()
                    return False
                except OSError:
                    return True
            try:
                wait_until(epmd_gone, 10, "epmd to stop", interval=0.05)
            except AssertionError:
                pass  # teardown: nothing more to do about it
            self.epmd_port = None
        if self.dir:
            _shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
