"""MI over mi_datagram (JSON-RPC 2.0 over UDP) with the official client,
`opensips.mi` from PyPI's `opensips` package, wrapped thinly because:

* its datagram connector takes its timeout when it is built: one connector
  per timeout asked for;
* it turns every failure into OpenSIPSMIException and keeps what happened as
  the exception's cause: a JSON-RPC error (code, message) becomes MIError, a
  socket timeout TimeoutError, another socket error that OSError;
* a dead server just does not answer: after a timeout or a socket error,
  check_alive() may say so with ServerDied instead.
"""

try:
    from opensips.mi import OpenSIPSMI, OpenSIPSMIException
    from opensips.mi.jsonrpc_helper import JSONRPCError
except ImportError as e:
    raise ImportError("the `opensips` Python package is missing: "
                      "pip install -r tests/requirements.txt") from e

from .util import DEFAULT_TIMEOUT

REPLY_BUFFER = 1 << 17  # mi_datagram answers up to 65457 bytes


class MIError(Exception):
    """The server answered a JSON-RPC error."""

    def __init__(self, method, code, message, data=None):
        self.method, self.code, self.message = method, code, message
        self.error = {"code": code, "message": message}  # the JSON-RPC error object
        if data is not None:
            self.error["data"] = data
        super().__init__(f"MI {method} failed: {self.error}")


class ServerDied(AssertionError):
    pass


class MIClient:
    def __init__(self, port, check_alive=None, host="127.0.0.1"):
        self.host, self.port = host, port
        self.check_alive = check_alive or (lambda: None)
        self._connectors = {}  # timeout -> OpenSIPSMI

    def call(self, method, params=None, timeout=DEFAULT_TIMEOUT):
        mi = self._connectors.get(timeout)
        if mi is None:
            mi = self._connectors[timeout] = OpenSIPSMI(
                "datagram", datagram_ip=self.host, datagram_port=self.port,
                datagram_timeout=timeout, datagram_buffer_size=REPLY_BUFFER)
        try:
            return mi.execute(method, params)
        except OpenSIPSMIException as e:
            cause = e.__cause__
            if isinstance(cause, JSONRPCError):
                raise MIError(method, cause.code, cause.message, cause.data) from None
            err = cause.args[0] if cause is not None and cause.args else None
            if not isinstance(err, OSError):
                raise  # an answer that is no JSON-RPC
            self.check_alive()
            if isinstance(err, TimeoutError):
                raise TimeoutError(f"no MI answer to {method} within {timeout}s") from None
            raise err from None
