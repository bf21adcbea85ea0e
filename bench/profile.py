#!/usr/bin/env python3
"""Profile bench rows with perf (how doc/benchmarks.md's profiles were made).

    python3 bench/profile.py [--module SO] [--seconds S] [--call-graph dwarf] \\
        OUT_PREFIX ROW_KEY[,ROW_KEY...]

Starts one OpenSIPS with the bench's script and subscriptions for the given
rows (keys of ROWS in bench.py, e.g. D_N,RR_N,RR_1000 or SD,SFO,SRR or
QD,QFO - the Q rows start a RabbitMQ broker), warms each row up, then runs
`perf record -F 2000` on it: on the UDP workers for a synchronous row (one
measurement of about --seconds), on every process of the server for an
asynchronous one (--seconds measurements of --async-events per worker).
Writes OUT_PREFIX.KEY.data; read it with e.g.

    perf report -i OUT.RR_N.data --no-children --sort dso,sym -g none
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("rows")
    ap.add_argument("--module", default=str(B.EVV_MODULE))
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--async-events", type=int, default=2000)
    ap.add_argument("--call-graph", default="fp", help="fp (default) or dwarf")
    a = ap.parse_args()
    rows = [B.BY_KEY[k] for k in a.rows.split(",")]
    args = argparse.Namespace(workers=2, log_level=1)
    reaper = B.Reaper()
    rpc = broker = srv = subs = None
    wd = tempfile.mkdtemp(prefix="evv-prof-")
    reaper.tell("dir", wd)
    try:
        if any(r.transport == "stream" for r in rows):
            rpc = B.RpcServer(reaper)
        if any(r.transport == "rmq" for r in rows):
            broker = B.Broker(reaper)
            broker.start()
        srv = B.BenchOpenSips(wd, a.module, rows, args, rabbitmq=broker is not None)
        subs = B.Subscribers(wd, rpc, broker)
        srv.start()
        reaper.tell("pgid", srv.proc.pid)
        for r in rows:
            for ev, sock in zip(r.events, subs.sockets_for(r)):
                srv.subscribe(ev, sock)
        run = B.Runner(srv, subs, 2, ours=True)
        for r in rows:
            is_async = r.transport in B.ASYNC
            run.measure(r, 2000)
            rate, _ = run.measure(r, a.async_events if is_async else 2000)
            n = a.async_events if is_async else int(rate * a.seconds / 2)
            pids = srv.pids() if is_async else run.worker_pids
            cg = ["--call-graph", "dwarf,8192"] if a.call_graph == "dwarf" else ["-g"]
            perf = subprocess.Popen(
                ["perf", "record", "-q", "-F", "2000", *cg, "-p", ",".join(map(str, pids)),
                 "-o", f"{a.out}.{r.key}.data"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            res = [run.measure(r, n) for _ in range(int(a.seconds) if is_async else 1)]
            perf.send_signal(2)
            perf.wait()
            print(r.key, "events" if is_async else "raises", n * 2 * len(res),
                  "rates", [round(x[0]) for x in res], f"-> {a.out}.{r.key}.data", flush=True)
    finally:
        if srv:
            srv.stop()
        if subs:
            subs.close()
        for thing in (rpc, broker):
            if thing:
                thing.close()
        reaper.close()


if __name__ == "__main__":
    main()
