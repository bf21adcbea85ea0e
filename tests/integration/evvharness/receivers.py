"""What event subscribers got: receivers for event_datagram (UDP, unix
datagram), event_flatstore (files) and event_stream (a JSON-RPC server),
collected by background threads, and the per-test factory of them."""

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from .util import DEFAULT_TIMEOUT, wait_until


def identity(ev):
    """(tag, i) of an event the script raised: which raise it was, when
    every request has a tag of its own."""
    p = ev.get("params")
    if isinstance(p, dict):
        return p.get("tag"), int(p.get("i"))
    return p[-1], int(p[-2])       # flatstore: pid, i, tag


def tag_of(ev):
    """The `tag` parameter of an event a receiver got: a named parameter
    (JSON), or the last field of a flatstore line (`EVENT,pid,i,tag`)."""
    p = ev.get("params")
    if isinstance(p, dict):
        return p.get("tag")
    if isinstance(p, list) and p:
        return p[-1]
    return None


class Receiver:
    """What one subscriber got, in arrival order: dicts {method, params}.

    Counts are kept as events arrive, so that waiting on them costs the
    same with 10 events as with 400 000: a count that walked the list
    would hold the interpreter lock for longer and longer while the
    receiving threads wait, and a busy test could never catch up."""

    socket = None  # the event socket string, e.g. "udp:127.0.0.1:4000"

    def __init__(self):
        self._events = []
        self._tally = Counter()  # (method, tag) -> events
        self._family = Counter()  # (method, family) -> events tagged family/n
        self._lock = threading.Lock()

    def _add(self, ev):
        tag = tag_of(ev)
        with self._lock:
            self._events.append(ev)
            self._tally[ev["method"], tag] += 1
            if isinstance(tag, str) and "/" in tag:
                # a burst's own tag, `family/n`: counted in its family too
                self._family[ev["method"], tag.split("/", 1)[0]] += 1

    def events(self, event=None):
        with self._lock:
            evs = list(self._events)
        return [e for e in evs if event is None or e["method"] == event]

    def count(self, event=None):
        with self._lock:
            if event is None:
                return len(self._events)
            return sum(n for (m, _), n in self._tally.items() if m == event)

    def tag_count(self, event, tag):
        """Events of `event` whose `tag` parameter is `tag` (or, for a tag
        without a `/`, `tag/anything`: the bursts of Raiser(unique=True))."""
        with self._lock:
            return self._tally[event, tag] + self._family[event, tag]

    def wait_count(self, n, event=None, timeout=DEFAULT_TIMEOUT):
        wait_until(lambda: self.count(event) >= n, timeout,
                   f"{n} x {event or 'any event'} at {self.socket} (got {self.count(event)})")

    def close(self):
        pass

    def __repr__(self):
        return f"<{type(self).__name__} {self.socket}>"


# A receiver's thread reads while the workers send in bursts of thousands;
# what it has not read yet waits in the socket's buffer, and a full buffer
# drops datagrams the sender was told were sent. As root the buffer can be
# made larger than net.core.rmem_max allows (SO_RCVBUFFORCE).
RCVBUF_BYTES = 64 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class _DatagramReceiver(Receiver):
    """delay: seconds the reader waits after each datagram (a slow
    subscriber: what the sender sends meanwhile waits in the socket's
    buffer, and a unix sender gets EAGAIN once its queue is full)."""

    def __init__(self, family, address, delay=0.0):
        super().__init__()
        self.family = family
        self.address = address
        self.delay = delay
        self._stop = False
        self._thread = None
        self._new_socket()

    def _new_socket(self):
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)

    def _start(self):
        self.sock.bind(self.address)
        self.sock.settimeout(0.05)
        self._stop = False
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
            if self.delay:
                time.sleep(self.delay)
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

    def kernel_drops(self):
        """Datagrams the kernel dropped at this socket (its buffer was
        full): sent, as far as the sender knows, and never received."""
        local = f"0100007F:{self.port:04X}"
        with open("/proc/net/udp") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 12 and fields[1] == local:
                    return int(fields[-1])
        return 0


class UnixReceiver(_DatagramReceiver):
    """unix datagram listener; bind=False gives a dead subscriber (nobody
    bound at the path: event_datagram's sendto fails at once) that can be
    brought to life later with bind(), and dead again with unbind(), as
    often as needed; events() is what all its lives got."""

    def __init__(self, path, bind=True, delay=0.0):
        super().__init__(socket.AF_UNIX, str(path), delay)
        self.path = Path(path)
        self.socket = f"unix:{path}"
        if bind:
            self.bind()

    def bind(self):
        assert not self.bound, f"{self} is bound already"
        self._start()

    def unbind(self):
        """Dead again: the socket closed and its path removed (a datagram
        not read yet is lost with it, as with a subscriber that dies)."""
        assert self.bound, f"{self} is not bound"
        self.close()
        self._thread = None
        self._new_socket()

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
    """event_flatstore writes `EVENT,value1,value2...` lines to a file;
    each look reads only the whole lines added since the last one."""

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self.socket = f"flatstore:{path}"
        self._offset = 0
        self._reading = threading.Lock()  # one reader moves the offset at a time

    def _read_new(self):
        with self._reading:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1      # a line still being written waits
            self._offset += end
            for line in data[:end].decode().splitlines():
                fields = line.split(",")
                self._add({"method": fields[0], "params": fields[1:], "raw": line})

    def events(self, event=None):
        self._read_new()
        return super().events(event)

    def count(self, event=None):
        self._read_new()
        return super().count(event)

    def tag_count(self, event, tag):
        self._read_new()
        return super().tag_count(event, tag)


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
        self._answers = []  # (request, "ok" | "error"), as answered
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

    def answered(self, event=None, answer=None):
        """Requests answered so far (of `event`, with `answer` "ok" or
        "error"), in the order they were answered; a held request is not
        answered until released."""
        with self._mlock:
            got = list(self._answers)
        return [req for req, a in got
                if (event is None or req.get("method") == event)
                and (answer is None or a == answer)]

    def held(self):
        with self._mlock:
            return [req for _, req in self._held]

    def release(self, answer_for=lambda req: "ok", limit=None, together=False):
        """Answer the held requests (the first `limit` of them, default all);
        answer_for(request) -> "ok" | "error". Each answer is a write of its
        own, or with together=True all of a connection's answers are one
        write, which event_stream then reads in one read. Note: event_stream
        cannot take 6 or more answers arriving in one read (it then drops
        the connection and fails what is pending on it, test_stream_limits.py):
        release one at a time and wait for its effect when that matters."""
        with self._mlock:
            n = len(self._held) if limit is None else limit
            held, self._held = self._held[:n], self._held[n:]
        if together:
            batches = {}
            for conn, req in held:
                batches.setdefault(conn, []).append((req, answer_for(req)))
            for conn, answers in batches.items():
                self._reply_all(conn, answers)
        else:
            for conn, req in held:
                self._reply(conn, req, answer_for(req))
        return [req for _, req in held]

    def _reply(self, conn, req, answer):
        self._reply_all(conn, [(req, answer)])

    def _reply_all(self, conn, answers):
        # recorded before they are sent (the test may look as soon as the
        # module has read them), taken back if they could not be sent
        with self._mlock:
            self._answers.extend(answers)
        try:
            conn.sendall(b"".join(self._answer(req, a) for req, a in answers))
        except OSError:
            with self._mlock:
                for req, a in answers:
                    self._answers.remove((req, a))
                    self._answers.append((req, a + " (not sent)"))

    @staticmethod
    def _answer(req, answer):
        if answer == "ok":
            reply = {"jsonrpc": "2.0", "id": req["id"], "result": "OK"}
        else:
            reply = {"jsonrpc": "2.0", "id": req["id"],
                     "error": {"code": -32000, "message": "refused by test"}}
        return json.dumps(reply).encode()

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

    def _keep(self, r):
        self.all.append(r)
        return r

    def udp(self, n=None):
        if n is not None:
            return [self.udp() for _ in range(n)]
        return self._keep(UdpReceiver())

    def unix(self, bind=True, delay=0.0):
        return self._keep(UnixReceiver(self._path("u").with_suffix(".sock"), bind=bind,
                                       delay=delay))

    def dead(self, delay=0.0):
        """A subscriber whose raise fails at once (unix path nobody bound)."""
        return self.unix(bind=False, delay=delay)

    def tcp(self, answer="ok"):
        """A JSON-RPC server for event_stream; answer "ok" | "error" | "hold"."""
        return self._keep(JsonRpcServer(answer))

    def flatstore(self):
        return self._keep(FlatstoreReceiver(self._path("f").with_suffix(".log")))

    def close(self):
        for r in self.all:
            r.close()
