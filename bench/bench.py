#!/usr/bin/env python3
"""Raise-rate benchmark for event_virtual (`make bench`).

Starts a real OpenSIPS (from $OPENSIPS_SRC) whose UDP worker processes raise
events in a script loop, and measures raises per second for

  * a direct UDP subscription        (event_datagram, udp:127.0.0.1:P)
  * virtual ROUND-ROBIN over 3 UDP subscribers
  * virtual PARALLEL    over 3 UDP subscribers
  * virtual FAILOVER    over 3 UDP subscribers

with the module under test ($EVV_MODULE, default <repo>/event_virtual.so) and,
in a second OpenSIPS run (the two modules cannot be loaded together), with the
C module $OPENSIPS_SRC/modules/event_virtual/event_virtual.so when it is built.

How one measurement works: the client sends W SIP requests at once (one per
UDP worker; a worker busy in its loop does not read the shared socket, so W
requests land on W different workers - every reply carries the worker's $pp
and the round is repeated if two replies come from the same process). Each
request carries X-Count: N; the route raises the row's event N times in a
`while` loop, then answers with sl_send_reply. The client times from the first
send until the last reply: rate = W * N / elapsed. Rows are interleaved within
a round (in rotating order) and the reported figure is the MEDIAN over rounds.

Subscriber sockets are bound but never read: sends succeed and the kernel
drops what does not fit. Nothing here asserts timings; it only reports them.

Usage: python3 bench/bench.py [--workers 2] [--events N] [--rounds R] [--markdown]
"""

import argparse
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))

import evvharness  # noqa: E402  (reads OPENSIPS_SRC / EVV_MODULE from the environment)
from evvharness import OpenSips, sip_request, virtual  # noqa: E402

# (row label, event name, policy or None for the direct subscription)
ROWS = [
    ("direct UDP", "B_DIRECT", None),
    ("ROUND-ROBIN x3", "B_RR", "ROUND-ROBIN"),
    ("PARALLEL x3", "B_PAR", "PARALLEL"),
    ("FAILOVER x3", "B_FO", "FAILOVER"),
]

BENCH_CFG = """\
log_level = {log_level}
stderror_enabled = yes
syslog_enabled = no
disable_core_dump = yes
max_while_loops = {max_loops}
udp_workers = {workers}
socket = udp:127.0.0.1:{sip_port}

mpath = "{mpath}"
loadmodule "proto_udp.so"
loadmodule "sl.so"
modparam("sl", "enable_stats", 0)
loadmodule "mi_datagram.so"
modparam("mi_datagram", "socket_name", "udp:127.0.0.1:{mi_port}")
loadmodule "event_datagram.so"
loadmodule "{module}"

# "X-Event: B_x" + "X-Count: N": raise B_x N times in this worker (params
# tag, pid - set once, outside the loop), then reply "200 done <pid> <raises>".
route {{
    if ($hdr(X-Event) == NULL)
        exit;
    $var(n) = $(hdr(X-Count){{s.int}});
    $var(i) = 0;
    $avp(evk) := "tag";
    $avp(evk) = "pid";
    $avp(evv) := $hdr(X-Tag);
    $avp(evv) = $pp;
    switch ($hdr(X-Event)) {{
{cases}
    }}
    sl_send_reply(200, "done $pp $var(i)");
    exit;
}}
"""

CASE = """\
        case "{ev}":
            while ($var(i) < $var(n)) {{
                raise_event("{ev}", $avp(evk), $avp(evv));
                $var(i) = $var(i) + 1;
            }}
            break;"""


class BenchOpenSips(OpenSips):
    """The harness's server with a bench script: only the modules needed,
    one tight raise loop per event, and a reply (sl) when the loop is done."""

    def __init__(self, workdir, module, workers, log_level, max_loops):
        super().__init__(workdir, workers=workers, log_level=log_level)
        self.module = Path(module)
        self.max_loops = max_loops

    def _write_cfg(self):
        cfg = BENCH_CFG.format(
            log_level=self.log_level, workers=self.workers,
            max_loops=self.max_loops, sip_port=self.sip_port, mi_port=self.mi_port,
            mpath=f"{evvharness.OPENSIPS_SRC}/modules/", module=self.module,
            cases="\n".join(CASE.format(ev=ev) for _, ev, _ in ROWS))
        self.cfg_path = self.workdir / "opensips.cfg"
        self.cfg_path.write_text(cfg)

    def start(self, attempts=3):
        try:
            return super().start(attempts)
        except BaseException as e:  # pytest.fail raises an OutcomeException
            if isinstance(e, KeyboardInterrupt):
                raise
            raise SystemExit(f"bench: {e}") from None


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Runner:
    def __init__(self, srv, workers):
        self.srv = srv
        self.workers = workers
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.lport = self.sock.getsockname()[1]
        self.seq = 0
        self.worker_pids = set()

    def once(self, event, count, timeout):
        """One measurement: W requests at once; returns (elapsed wall s,
        CPU s used by the known workers, pids that answered)."""
        msgs = []
        for _ in range(self.workers):
            self.seq += 1
            msgs.append((self.seq, sip_request(self.srv.sip_port, self.lport,
                                               self.seq, event, count)))
        wanted = {f"CSeq: {s} OPTIONS" for s, _ in msgs}
        dest = ("127.0.0.1", self.srv.sip_port)
        cpu0 = self.cpu_ns()
        t0 = time.perf_counter()
        for _, m in msgs:
            self.sock.sendto(m, dest)
        pids = []
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
            text = data.decode(errors="replace")
            lines = text.split("\r\n")
            cseq = next((l for l in lines if l.startswith("CSeq:")), None)
            if cseq not in wanted:
                continue  # a late reply of an earlier request
            wanted.discard(cseq)
            status = lines[0]  # SIP/2.0 200 done <pid> <raises>
            parts = status.split(" ")
            if not status.startswith("SIP/2.0 200 done ") or len(parts) != 5:
                raise SystemExit(f"bench: unexpected reply {status!r}")
            if int(parts[4]) != count:
                raise SystemExit(f"bench: worker {parts[3]} raised {parts[4]} times, "
                                 f"not {count}; log {self.srv.log.path}")
            pids.append(int(parts[3]))
        cpu1 = self.cpu_ns()
        return t1 - t0, (cpu1 - cpu0) / 1e9, pids

    def cpu_ns(self):
        """CPU time (ns, user + system) the known SIP workers used so far
        (/proc/PID/schedstat: first field, time spent on a CPU)."""
        total = 0
        for pid in self.worker_pids:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total

    def measure(self, event, count, timeout, retries=5):
        """(raises per second over all workers, raises per worker CPU
        second), retried until every worker got exactly one request."""
        for _ in range(retries):
            elapsed, cpu, pids = self.once(event, count, timeout)
            if len(set(pids)) == self.workers:
                if set(pids) != self.worker_pids:  # first time (warm-up): learn them
                    self.worker_pids = set(pids)
                    cpu = 0.0
                per_cpu = self.workers * count / cpu if cpu > 0 else float("nan")
                return self.workers * count / elapsed, per_cpu
            log(f"  ({event}: replies from pids {pids}: not one request per worker, again)")
        raise SystemExit(f"bench: could not get one request per worker for {event}")

    def close(self):
        self.sock.close()


def run_server(label, module, args, workdir):
    """Start one OpenSIPS with `module`, subscribe, measure; returns
    {event: [rate per round]}."""
    srv = BenchOpenSips(workdir, module, args.workers, args.log_level,
                        max_loops=args.events + 1)
    sinks = []
    runner = None
    try:
        log(f"[{label}] starting OpenSIPS with {module}")
        srv.start()

        def sink():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))  # bound, never read
            sinks.append(s)
            return f"udp:127.0.0.1:{s.getsockname()[1]}"

        for _, ev, policy in ROWS:
            if policy is None:
                srv.subscribe(ev, sink())
            else:
                srv.subscribe(ev, virtual(policy, sink(), sink(), sink()))
        runner = Runner(srv, args.workers)
        timeout = max(60.0, args.events / 1000.0)
        # warm-up: first raises per worker (lazy init, page faults, caches);
        # the first one also tells the worker pids
        for _, ev, _ in ROWS:
            runner.measure(ev, max(1, args.events // 10), timeout)
        rates = {ev: [] for _, ev, _ in ROWS}
        cpu_rates = {ev: [] for _, ev, _ in ROWS}
        for r in range(args.rounds):
            order = ROWS[r % len(ROWS):] + ROWS[:r % len(ROWS)]
            for _, ev, _ in order:
                wall, cpu = runner.measure(ev, args.events, timeout)
                rates[ev].append(wall)
                cpu_rates[ev].append(cpu)
            log(f"[{label}] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{ev} {rates[ev][-1]:,.0f}/s ({cpu_rates[ev][-1]:,.0f}/CPU-s)"
                for _, ev, _ in ROWS))
        srv._check_running()
        errors = srv.log.errors_since(0)
        if errors:
            log(f"[{label}] {len(errors)} ERROR line(s) in the OpenSIPS log, e.g.: {errors[0]}")
        return rates, cpu_rates
    finally:
        if runner:
            runner.close()
        srv.stop()  # never unsubscribes: the C module crashes on that
        for s in sinks:
            s.close()


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

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
        out = subprocess.run([str(evvharness.OPENSIPS_SRC / "opensips"), "-V"],
                             capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].replace("version: ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def command_line():
    env = f"OPENSIPS_SRC={evvharness.OPENSIPS_SRC} EVV_MODULE={evvharness.EVV_MODULE}"
    return f"{env} {shlex.join([Path(sys.executable).name] + sys.argv)}"


def summarise(values, stat):
    return max(values) if stat == "best" else statistics.median(values)


def build_table(ours, c_rates, stat, unit):
    """Rows of strings, header first. ours / c_rates: {event: [per round]}."""
    header = ["subscription", f"ours {unit}", "ours / direct"]
    if c_rates:
        header += [f"C {unit}", "C / direct", "ours / C"]
    rows = [header]
    od = summarise(ours["B_DIRECT"], stat)
    for label, ev, _ in ROWS:
        o = summarise(ours[ev], stat)
        row = [label, f"{o:,.0f}", f"{o / od:.2f}"]
        if c_rates:
            cd = summarise(c_rates["B_DIRECT"], stat)
            c = summarise(c_rates[ev], stat)
            row += [f"{c:,.0f}", f"{c / cd:.2f}", f"{o / c:.2f}"]
        rows.append(row)
    return rows


def format_plain(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows):
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2,
                    help="OpenSIPS UDP workers, one request (raise loop) each (default 2)")
    ap.add_argument("--events", type=int, default=8000,
                    help="raises per worker per row per round (default 8000)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds, rows interleaved in each (default 5)")
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="figure over the rounds shown in the table (default median)")
    ap.add_argument("--log-level", type=int, default=1,
                    help="OpenSIPS log_level (default 1: errors only)")
    ap.add_argument("--no-c", action="store_true",
                    help="skip the C module run")
    ap.add_argument("--markdown", action="store_true",
                    help="print the report as Markdown (to paste into docs)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work folder (cfg, OpenSIPS logs)")
    args = ap.parse_args()
    if args.workers < 1 or args.events < 1 or args.rounds < 1:
        ap.error("--workers, --events and --rounds must be >= 1")

    ours_module = Path(evvharness.EVV_MODULE).resolve()
    c_module = evvharness.OPENSIPS_SRC / "modules" / "event_virtual" / "event_virtual.so"
    cmd = command_line()
    workdir = Path(tempfile.mkdtemp(prefix="evv-bench-"))
    load_before = loadavg()
    t_start = time.monotonic()
    try:
        ours, ours_cpu = run_server("ours", ours_module, args, workdir / "ours")
        c_rates = c_cpu = None
        if args.no_c:
            c_note = "C module run skipped (--no-c)"
        elif c_module.is_file():
            c_rates, c_cpu = run_server("C", c_module, args, workdir / "c")
            c_note = str(c_module)
        else:
            c_note = f"not built at {c_module}: no C columns"
    finally:
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - t_start

    wall = build_table(ours, c_rates, args.stat, "raises/s")
    cpu = build_table(ours_cpu, c_cpu, args.stat, "raises/CPU-s")
    titles = (
        f"Raises per second, all {args.workers} worker(s) together, wall clock "
        f"({args.stat} of {args.rounds} rounds)",
        f"Raises per CPU-second of one worker (user + system time of the workers, "
        f"/proc/PID/schedstat; {args.stat} of {args.rounds} rounds)")
    facts = [
        ("machine", f"nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
                    f"{platform.system()} {platform.release()}"),
        ("load average", f"{load_before} before, {loadavg()} after"),
        ("OpenSIPS", f"{opensips_version()} ({evvharness.OPENSIPS_SRC})"),
        ("module", str(ours_module)),
        ("C module", c_note),
        ("setting", f"{args.workers} UDP worker(s) x {args.events} raises per row per round, "
                    f"{args.rounds} rounds, {args.stat} shown; log_level {args.log_level}; "
                    f"subscribers: bound UDP sockets, never read"),
        ("command", cmd),
        ("took", f"{total:.0f} s"),
    ]
    if args.markdown:
        for title, rows in zip(titles, (wall, cpu)):
            print(f"{title}:\n")
            print(format_markdown(rows))
            print()
        for k, v in facts:
            print(f"- {k}: {'`' + v + '`' if k == 'command' else v}")
    else:
        for title, rows in zip(titles, (wall, cpu)):
            print(title)
            print(format_plain(rows))
            print()
        for k, v in facts:
            print(f"{k + ':':13} {v}")


if __name__ == "__main__":
    main()
