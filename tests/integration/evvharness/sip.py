"""The SIP request the test and bench scripts act on (shared with
bench/bench.py): an OPTIONS whose X-Event names the event to raise, X-Count
how many times, X-Tag a parameter value."""

import os


def sip_request(sip_port, lport, seq, event, count=1, tag="x"):
    """The request as bytes; lport is the sender's UDP port (Via), seq makes
    it unique (branch, Call-ID, CSeq: the bench matches replies by
    `CSeq: <seq> OPTIONS`)."""
    pid = os.getpid()
    return (
        f"OPTIONS sip:evv@127.0.0.1:{sip_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK-evv-{pid}-{seq}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:tester@127.0.0.1>;tag=evv{seq}\r\n"
        f"To: <sip:evv@127.0.0.1>\r\n"
        f"Call-ID: evv-{pid}-{seq}@127.0.0.1\r\n"
        f"CSeq: {seq} OPTIONS\r\n"
        f"X-Event: {event}\r\n"
        f"X-Count: {count}\r\n"
        f"X-Tag: {tag}\r\n"
        f"Content-Length: 0\r\n\r\n").encode()
