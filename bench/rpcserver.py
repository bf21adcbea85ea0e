#!/usr/bin/env python3
"""A fast JSON-RPC server for event_stream subscribers (bench only).

One process, one selector loop, any number of listening TCP sockets on
127.0.0.1. Every request (an object with an "id") is answered at once with
a result; notifications are only counted. Requests are counted per method
(the event name) and per listening port.

Driven over stdin/stdout, one line per command:

    listen         -> prints the port of a new listening socket
    reserve        -> prints the port of a new socket bound but not listening
                      (a connection to it is refused): a subscriber that is down
    open PORT      -> the reserved PORT starts listening (the subscriber is back)
    close PORT     -> PORT stops listening, its connections are closed and it
                      is bound again, not listening (down again)
    counts         -> prints {"method": answered, ...} as one JSON line
    ports          -> prints {"port": answered, ...}
    quit / EOF     -> exits (EOF: the bench died)

It also dies with its parent (PR_SET_PDEATHSIG, set by the bench).
"""

import json
import os
import selectors
import socket
import sys

REPLY = '{"jsonrpc":"2.0","id":%d,"result":"OK"}'
# Every answer is padded (leading white space, which JSON allows) to
# ANSWER_SIZE bytes. event_stream reads answers 8192 bytes at a time and
# drops the connection, failing everything pending on it, when one read holds
# more than 5 answers ("too many reads retries", STREAM_MAX_PENDING_READS in
# modules/event_stream/stream_send.c); it also loses an answer split across
# two reads. 2048-byte answers, written whole, put exactly 4 in a full read.
ANSWER_SIZE = 2048


def main():
    sel = selectors.DefaultSelector()
    decoder = json.JSONDecoder()
    counts = {}
    per_port = {}
    stdin = sys.stdin.buffer.raw
    os.set_blocking(stdin.fileno(), False)
    sel.register(stdin, selectors.EVENT_READ, ("ctl", None))
    ctl_buf = b""
    reserved = {}  # port -> its socket (bound; listening after "open")

    def reserve(port):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        return ls

    def out(line):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    while True:
        for key, _ in sel.select():
            kind, data = key.data
            if kind == "ctl":
                chunk = stdin.read(4096)
                if not chunk:
                    return
                ctl_buf += chunk
                while b"\n" in ctl_buf:
                    line, ctl_buf = ctl_buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd == "listen":
                        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                        ls.bind(("127.0.0.1", 0))
                        ls.listen(64)
                        ls.setblocking(False)
                        port = ls.getsockname()[1]
                        per_port[port] = 0
                        sel.register(ls, selectors.EVENT_READ, ("listen", port))
                        out(str(port))
                    elif cmd == "reserve":
                        ls = reserve(0)
                        port = ls.getsockname()[1]
                        reserved[port] = ls
                        per_port[port] = 0
                        out(str(port))
                    elif cmd.startswith("open "):
                        port = int(cmd.split()[1])
                        ls = reserved[port]
                        ls.listen(64)
                        ls.setblocking(False)
                        sel.register(ls, selectors.EVENT_READ, ("listen", port))
                        out("ok")
                    elif cmd.startswith("close "):
                        port = int(cmd.split()[1])
                        for k in list(sel.get_map().values()):
                            if k.data[0] == "conn" and k.data[1][0] == port:
                                sel.unregister(k.fileobj)
                                k.fileobj.close()
                        ls = reserved[port]
                        try:
                            sel.unregister(ls)
                        except KeyError:
                            pass
                        ls.close()
                        try:
                            reserved[port] = reserve(port)
                            out("ok")
                        except OSError as e:
                            out(f"error {e}")
                    elif cmd == "counts":
                        out(json.dumps(counts))
                    elif cmd == "ports":
                        out(json.dumps(per_port))
                    elif cmd == "quit":
                        return
            elif kind == "listen":
                try:
                    conn, _ = key.fileobj.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)  # sendall below; recv only when readable
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, ("conn", [data, ""]))
            else:  # a connection from event_stream
                conn = key.fileobj
                try:
                    chunk = conn.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(conn)
                    conn.close()
                    continue
                port = data[0]
                buf = data[1] + chunk.decode(errors="replace")
                replies = []
                pos, n = 0, len(buf)
                while pos < n:
                    while pos < n and buf[pos] in " \r\n\t":
                        pos += 1
                    if pos >= n:
                        break
                    try:
                        msg, pos2 = decoder.raw_decode(buf, pos)
                    except ValueError:
                        break  # incomplete: wait for more
                    pos = pos2
                    method = msg.get("method")
                    counts[method] = counts.get(method, 0) + 1
                    per_port[port] += 1
                    rid = msg.get("id")
                    if rid is not None:
                        r = REPLY % rid
                        replies.append(" " * (ANSWER_SIZE - len(r)) + r)
                data[1] = buf[pos:]
                if replies:
                    try:
                        conn.sendall("".join(replies).encode())
                    except OSError:
                        pass


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
