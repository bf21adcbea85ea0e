"""make demo: event_virtual at work in a real OpenSIPS, told as it happens.

Starts OpenSIPS with demo/opensips.cfg (its ports, module folder and
module path put in), three receivers on unix datagram sockets (alpha, beta,
gamma), subscribes a FAILOVER and a ROUND-ROBIN virtual subscriber over
them, raises events, stops alpha half way, and shows where every event
went, the failover, event_virtual_list and the statistics. Everything it
starts stops with it, within a minute.

OPENSIPS_SRC  a built OpenSIPS tree (the Makefile passes the provisioned one)
EVV_MODULE    the event_virtual.so to load
"""

import ctypes
import json
import os
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
NAMES = ("alpha", "beta", "gamma")
WAIT = 3.0          # how long an event may take to arrive
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
        self.inbox = inbox
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
            self.inbox.append((self.name, event["method"], event.get("params", {}).get("n")))

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


def show_list(mi):
    for s in mi.execute("event_virtual_list", {}).get("Subscriptions", []):
        names = [Path(sub["socket"]).stem for sub in s["Subscribers"]]
        head = f"  {s['event']}: {s['policy']}"
        if "next" in s:
            head += f", the next event goes to {names[s['next']]} first"
        say(head)
        for name, sub in zip(names, s["Subscribers"]):
            state = sub["state"]
            if state == "skipped":
                state += f" for {sub['skipped_for_ms'] / 1000:.1f} s more"
            say(f"    {name:6} {state:24} attempts {sub['attempts']:2}  failures {sub['failures']}")


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
    # nothing the demo started outlives it, whatever happens
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("demo: took too long, stopping"))
    signal.alarm(int(DEADLINE))
    try:
        version = subprocess.run([str(SRC / "opensips"), "-V"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        say(f"== {version}, with {MODULE.name} from {MODULE.parent}")
        say(f"   config: demo/opensips.cfg (as run: {cfg}), log: {folder / 'opensips.log'}")
        proc = start_opensips(cfg, log, mi)
        say(f"== receivers alpha, beta, gamma listen on unix:{folder}/<name>.sock")

        subs = {
            "E_DEMO_FAILOVER": ("FAILOVER", ("alpha", "beta")),
            "E_DEMO_ROUND_ROBIN": ("ROUND-ROBIN", ("alpha", "beta", "gamma")),
        }
        say("== subscribing over MI (opensips-cli -x mi event_subscribe EVENT SOCKET 600):")
        for event, (policy, names) in subs.items():
            sock = f"virtual:{policy} " + " ".join(f"unix:{receivers[n].path}" for n in names)
            mi.execute("event_subscribe", {"event": event, "socket": sock, "expire": 600})
            say(f"   {event:19} virtual:{policy} " + " ".join(f"unix:.../{n}.sock" for n in names))
        say("== event_virtual_list")
        show_list(mi)

        count = {e: 0 for e in subs}

        def stats_now():
            stats = mi.execute("get_statistics", {"statistics": ["event_virtual:"]})
            return {k.split(":")[1]: int(v) for k, v in stats.items()}

        def ended(stats):
            return stats["events_delivered"] + stats["events_failed"]

        def raise_some(event, n):
            for _ in range(n):
                count[event] += 1
                seen = len(inbox)
                before = stats_now()
                mi.execute("raise_event", {"event": event,
                                           "params": json.dumps({"n": count[event]})})
                until = time.monotonic() + WAIT
                while len(inbox) == seen and time.monotonic() < until:
                    time.sleep(0.005)
                got = inbox[seen:]
                where = ", ".join(name for name, _, _ in got) or "nobody (lost)"
                # the statistics are counted once the event's walk ends
                after = stats_now()
                while ended(after) == ended(before) and time.monotonic() < until:
                    time.sleep(0.005)
                    after = stats_now()
                if after["failovers"] > before["failovers"]:
                    where += "  (failover: a subscriber before it failed)"
                say(f"   {event} #{count[event]:<2} -> {where}")

        say("== raising events: FAILOVER goes to alpha, ROUND-ROBIN takes turns")
        raise_some("E_DEMO_FAILOVER", 3)
        raise_some("E_DEMO_ROUND_ROBIN", 6)

        say("== stopping receiver alpha (its socket is gone: sends to it fail)")
        receivers["alpha"].stop()
        say("== raising events: FAILOVER moves on to beta, ROUND-ROBIN passes alpha over")
        raise_some("E_DEMO_FAILOVER", 3)
        raise_some("E_DEMO_ROUND_ROBIN", 6)

        say("== event_virtual_list (alpha failed: skipped for failover_timeout, 10 s)")
        show_list(mi)
        stats = mi.execute("get_statistics", {"statistics": ["event_virtual:"]})
        say("== get_statistics event_virtual:")
        for name, value in stats.items():
            say(f"   {name} = {value}")
        lost = int(stats["event_virtual:events_failed"])
        say(f"== done: {sum(count.values())} events raised, {lost} lost; stopping OpenSIPS")
        return 0 if lost == 0 else 1
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
