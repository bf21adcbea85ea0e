"""make demo: event_virtual at work in a real OpenSIPS, told as it happens.

Starts OpenSIPS with demo/opensips.cfg (its ports, module folder and
module path put in), four receivers on unix datagram sockets (alpha, beta,
gamma, delta), and subscribes over MI:

  E_DEMO_FAILOVER     virtual:FAILOVER alpha beta
  E_DEMO_ROUND_ROBIN  virtual:ROUND-ROBIN alpha beta gamma
  E_DEMO_HASH         virtual:HASH(callid) alpha beta gamma
  E_DEMO_SPOOL        virtual:FAILOVER SPOOL(100) delta

It raises events and shows where each went; stops delta, so that its
events are held (event_virtual_list and the statistics say so), starts it
again and replays them in order (event_virtual_retry); then stops alpha,
and shows the failover, the round-robin passing it over and only alpha's
calls moving. Every MI call is printed as the `opensips-cli` line that
makes it, to repeat by hand against your own server. Everything it starts
stops with it, within a minute.

OPENSIPS_SRC  a built OpenSIPS tree (the Makefile passes the provisioned one)
EVV_MODULE    the event_virtual.so to load
"""

import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from opensips.mi import OpenSIPSMI, OpenSIPSMIException

HERE = Path(__file__).resolve().parent
SRC = Path(os.environ["OPENSIPS_SRC"])
MODULE = Path(os.environ["EVV_MODULE"])
NAMES = ("alpha", "beta", "gamma", "delta")
WAIT = 2.0          # how long an event may take to arrive
HELD_WAIT = 0.3     # how long to make sure an event did not arrive
DEADLINE = 50.0     # the whole demo stops by itself after this long


def say(text=""):
    print(text, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A unix datagram socket that event_datagram sends events to."""

    def __init__(self, name, folder, inbox):
        self.name = name
        self.path = str(folder / f"{name}.sock")
        self.socket = f"unix:{self.path}"
        self.inbox = inbox
        self.running = False
        self.start()

    def start(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            event = json.loads(data)
            self.inbox.append((self.name, event["method"], event.get("params", {})))

    def stop(self):
        """Gone: nobody listens on the path any more, so a send fails."""
        self.running = False
        self.thread.join()
        self.sock.close()
        os.unlink(self.path)


def write_cfg(folder, sip_port, mi_port):
    text = (HERE / "opensips.cfg").read_text()
    for old, new in (
            ("udp:127.0.0.1:5060", f"udp:127.0.0.1:{sip_port}"),
            ("udp:127.0.0.1:8080", f"udp:127.0.0.1:{mi_port}"),
            ("/usr/local/lib64/opensips/modules/", f"{SRC}/modules/"),
            ('loadmodule "event_virtual.so"', f'loadmodule "{MODULE}"')):
        assert old in text, f"demo/opensips.cfg no longer has {old!r}"
        text = text.replace(old, new)
    cfg = folder / "opensips.cfg"
    cfg.write_text(text)
    return cfg


def start_opensips(cfg, log, mi):
    def die_with_parent():
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    proc = subprocess.Popen([str(SRC / "opensips"), "-F", "-f", str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_parent)
    until = time.monotonic() + 15
    while time.monotonic() < until:
        if proc.poll() is not None:
            break
        try:
            mi.execute("version", {})
            say(f"   $ {cli_line('version', {})}")
            return proc
        except OpenSIPSMIException:
            time.sleep(0.1)
    stop_opensips(proc)
    raise SystemExit(f"OpenSIPS did not start; its log:\n{Path(log.name).read_text()[-3000:]}")


def stop_opensips(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


# OpenSIPS 4.0 names MI commands <module>:<command>, and opensips-cli takes
# only those there (the server answers the old names too, as used here)
NAMES_40 = {"version": "core:version", "event_subscribe": "evi:subscribe",
            "raise_event": "evi:raise", "get_statistics": "statistics:get",
            "event_virtual_list": "event_virtual:event_virtual_list",
            "event_virtual_hash": "event_virtual:event_virtual_hash",
            "event_virtual_retry": "event_virtual:event_virtual_retry"}
CLI_NAMES = {}   # NAMES_40 on 4.0


def cli_line(method, params):
    """The opensips-cli command that makes this MI call."""
    name = CLI_NAMES.get(method, method)
    if method == "raise_event":
        # opensips-cli splits raise_event's parameters into an array of
        # strings unless told -j; with -j the JSON object must be given as
        # a JSON string (-- ends opensips-cli's own options)
        words = ["opensips-cli", "-x", "--", "mi", "-j", name, params["event"]]
        if "params" in params:
            words.append(json.dumps(params["params"]))
    elif method in ("event_subscribe", "get_statistics"):
        words = ["opensips-cli", "-x", "mi", name,
                 *(v if not isinstance(v, list) else " ".join(v) for v in params.values())]
    else:
        words = ["opensips-cli", "-x", "mi", name, *(f"{k}={v}" for k, v in params.items())]
    return " ".join(shlex.quote(str(w)) for w in words)


class Demo:
    def __init__(self, mi, receivers, inbox):
        self.mi, self.receivers, self.inbox = mi, receivers, inbox
        self.count = {}

    def call(self, method, params=None, quiet=False):
        params = params or {}
        line = cli_line(method, params)
        if not quiet:
            say(f"   $ {line}")
        return self.mi.execute(method, params), line

    def short(self, sock_text):
        for r in self.receivers.values():
            sock_text = sock_text.replace(r.socket, r.name)
        return sock_text

    def subscribe(self, event, policy, names):
        sock = f"virtual:{policy} " + " ".join(self.receivers[n].socket for n in names)
        self.call("event_subscribe", {"event": event, "socket": sock, "expire": 600})

    def show_list(self):
        res, _ = self.call("event_virtual_list")
        for s in res.get("Subscriptions", []):
            subs = s["Subscribers"]
            head = f"     {s['event']}: {self.short(s['socket'])}"
            if "next" in s:
                head += f"; the next event starts at {self.short(subs[s['next']]['socket'])}"
            say(head)
            if "Spool" in s:
                sp = s["Spool"]
                say(f"       spool: {sp['held']} held ({sp['bytes']} bytes), spooled "
                    f"{sp['spooled']}, replayed {sp['replayed']}, dropped {sp['dropped']}")
            for sub in subs:
                state = sub["state"]
                if state == "skipped":
                    state += f" for {sub['skipped_for_ms'] / 1000:.1f} s more"
                say(f"       {self.short(sub['socket']):6} {state:24} attempts "
                    f"{sub['attempts']:2}  failures {sub['failures']}")

    def stats(self, names=None):
        res, _ = self.call("get_statistics", {"statistics": ["event_virtual:"]})
        stats = {k.split(":", 1)[1]: int(v) for k, v in res.items()}
        for name, value in stats.items():
            if names is None or name in names:
                say(f"     {name} = {value}")
        return stats

    def raise_one(self, event, expect=True, **params):
        """Raise event with n (counted per event) and params; the receivers
        that got it."""
        n = self.count[event] = self.count.get(event, 0) + 1
        seen = len(self.inbox)
        _, line = self.call("raise_event", {"event": event,
                                            "params": json.dumps({"n": n, **params})},
                            quiet=True)
        until = time.monotonic() + (WAIT if expect else HELD_WAIT)
        while len(self.inbox) == seen and time.monotonic() < until:
            time.sleep(0.005)
        if expect:  # PARALLEL would bring more than one; none here
            time.sleep(0.01)
        got = [name for name, _, _ in self.inbox[seen:]]
        say(f"   $ {line}\n       -> {', '.join(got) or 'nobody'}")
        return got


def main():
    folder = Path(tempfile.mkdtemp(prefix="evv-demo-", dir="/tmp"))
    inbox = []
    receivers = {n: Receiver(n, folder, inbox) for n in NAMES}
    sip_port, mi_port = free_port(), free_port()
    cfg = write_cfg(folder, sip_port, mi_port)
    mi = OpenSIPSMI("datagram", datagram_ip="127.0.0.1", datagram_port=mi_port,
                    datagram_timeout=2)
    log = open(folder / "opensips.log", "wb")
    proc = None
    started = time.monotonic()
    # nothing the demo started outlives it, whatever happens
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("demo: took too long, stopping"))
    signal.alarm(int(DEADLINE))
    try:
        version = subprocess.run([str(SRC / "opensips"), "-V"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        say(f"== {version}, with {MODULE.name} from {MODULE.parent}")
        if int(version.split("opensips ")[1].split(".")[0]) >= 4:
            CLI_NAMES.update(NAMES_40)
        say(f"   config: demo/opensips.cfg (as run: {cfg}), log: {folder / 'opensips.log'}")
        say(f"   MI: mi_datagram on 127.0.0.1:{mi_port}: each `$ opensips-cli` line below is "
            f"the MI call the demo makes; against this server, add")
        say(f"   -o communication_type=datagram -o datagram_port={mi_port} after opensips-cli")
        proc = start_opensips(cfg, log, mi)
        say(f"== receivers {', '.join(NAMES)} listen on unix:{folder}/<name>.sock")
        demo = Demo(mi, receivers, inbox)

        say("== subscribing over MI")
        demo.subscribe("E_DEMO_FAILOVER", "FAILOVER", ("alpha", "beta"))
        demo.subscribe("E_DEMO_ROUND_ROBIN", "ROUND-ROBIN", ("alpha", "beta", "gamma"))
        demo.subscribe("E_DEMO_HASH", "HASH(callid)", ("alpha", "beta", "gamma"))
        demo.subscribe("E_DEMO_SPOOL", "FAILOVER SPOOL(100)", ("delta",))
        say("== event_virtual_list")
        demo.show_list()

        say("== FAILOVER goes to alpha; ROUND-ROBIN takes turns")
        for _ in range(2):
            demo.raise_one("E_DEMO_FAILOVER")
        for _ in range(3):
            demo.raise_one("E_DEMO_ROUND_ROBIN")

        say("== HASH(callid): every event of a call goes to the same receiver")
        calls = ("call-1", "call-2", "call-3", "call-4")
        placed = {}
        for c in calls * 2:
            got = demo.raise_one("E_DEMO_HASH", callid=c)
            placed.setdefault(c, set()).update(got)
        for c in calls:
            say(f"     {c}: {', '.join(sorted(placed[c]))}")
        kept = all(len(v) == 1 for v in placed.values())
        say("   and MI says where a call goes before any event of it is raised:")
        res, _ = demo.call("event_virtual_hash",
                           {"event": "E_DEMO_HASH", "index": 0, "value": "call-1"})
        say(f"     call-1 -> {demo.short(res['target'])}, then "
            + ", ".join(demo.short(a["socket"]) for a in res["Attempts"][1:]))
        kept = kept and placed["call-1"] == {demo.short(res["target"])}

        say("== SPOOL: delta, the only receiver of E_DEMO_SPOOL, stops; its events are held")
        receivers["delta"].stop()
        for _ in range(3):
            demo.raise_one("E_DEMO_SPOOL", expect=False)
        demo.show_list()
        demo.stats(("events_spooled", "events_replayed", "events_failed", "spool_held",
                    "spool_memory"))
        say("== delta is back; replay now rather than after failover_timeout (10 s)")
        receivers["delta"].start()
        seen = len(inbox)
        demo.call("event_virtual_retry", {"event": "E_DEMO_SPOOL"})
        until = time.monotonic() + WAIT
        while len(inbox) < seen + 3 and time.monotonic() < until:
            time.sleep(0.01)
        replayed = [p["n"] for name, _, p in inbox[seen:] if name == "delta"]
        say(f"     delta got #{', #'.join(map(str, replayed))}"
            + ("  (in the order raised)" if replayed == [1, 2, 3] else "  (NOT as raised)"))
        demo.raise_one("E_DEMO_SPOOL")

        say("== stopping receiver alpha (its socket is gone: sends to it fail)")
        receivers["alpha"].stop()
        say("== FAILOVER moves on to beta, ROUND-ROBIN passes alpha over, HASH moves only "
            "alpha's calls")
        for _ in range(2):
            demo.raise_one("E_DEMO_FAILOVER")
        for _ in range(3):
            demo.raise_one("E_DEMO_ROUND_ROBIN")
        moved = {}
        for c in calls:
            moved[c] = demo.raise_one("E_DEMO_HASH", callid=c)
        for c in calls:
            before = ", ".join(sorted(placed[c]))
            say(f"     {c}: {before} -> {', '.join(moved[c])}"
                + ("" if moved[c] == sorted(placed[c]) else "  (alpha's call, moved)"))
        kept = kept and all(moved[c] == sorted(placed[c]) for c in calls
                            if placed[c] != {"alpha"})

        say("== event_virtual_list (alpha failed: skipped for failover_timeout, 10 s)")
        demo.show_list()
        say("== statistics")
        stats = demo.stats()
        lost = stats["events_failed"] + stats["events_dropped"]
        ok = lost == 0 and replayed == [1, 2, 3] and kept and stats["spool_held"] == 0
        say(f"== done in {time.monotonic() - started:.1f} s: {sum(demo.count.values())} "
            f"events raised, {lost} lost; stopping OpenSIPS")
        return 0 if ok else 1
    finally:
        signal.alarm(0)
        if proc is not None:
            stop_opensips(proc)
        log.close()
        for r in receivers.values():
            if r.running:
                r.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
