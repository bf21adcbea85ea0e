"""A cluster of OpenSIPS servers on loopback, tied by OpenSIPS's clusterer
(db_mode 0, my_node_info / neighbor_node_info) over a bin: socket each
(proto_bin): the OpenSips options of each node, and the wait for the links."""

import socket
import struct
import time

from .util import lasting_port, wait_until

CLUSTER_ID = 1


def node_options(node_id, ports, cluster_id=CLUSTER_ID):
    """OpenSips keywords of node `node_id` (from 1) of the cluster whose
    nodes listen on `ports` (node i on ports[i - 1]): every other node is
    its neighbour; event_virtual's cluster_id is set."""
    url = "url=bin:127.0.0.1:{}".format
    clusterer = {
        "db_mode": 0,
        "my_node_id": node_id,
        "my_node_info": f"cluster_id={cluster_id},{url(ports[node_id - 1])}",
        # every 1 s, a link lost is seen within ~1 s, retried after 2
        "ping_interval": 1,
        "ping_timeout": 500,
        "node_timeout": 2,
    }
    # one neighbour per node: modparams are a dict here, and a pair needs one
    peers = [n for n in range(1, len(ports) + 1) if n != node_id]
    assert len(peers) == 1, "the harness writes one neighbor_node_info: two nodes"
    clusterer["neighbor_node_info"] = \
        f"cluster_id={cluster_id},node_id={peers[0]},{url(ports[peers[0] - 1])}"
    return {"sockets": [f"bin:127.0.0.1:{ports[node_id - 1]}"],
            "extra_modules": {"proto_bin": {}, "clusterer": clusterer},
            "virtual_params": {"cluster_id": cluster_id}}


def ports(n):
    """Bin ports for n nodes, outside the ephemeral range (a node started
    again gets its own back)."""
    return [lasting_port() for _ in range(n)]


def bin_port(srv):
    """The port of srv's bin: socket."""
    return next(int(s.rsplit(":", 1)[1]) for s in srv.sockets if s.startswith("bin:"))


def link_state(srv, node_id):
    """clusterer_list on srv: the link state of node_id ("Up", "Down", ...)."""
    for c in srv.mi("clusterer_list").get("Clusters", []):
        for n in c.get("Nodes", []):
            if n.get("node_id") == node_id:
                return n.get("link_state")
    return None


def wait_up(srv, node_id, timeout=30):
    """Until srv sees node_id's link Up (clusterer_list): srv can send to
    it. Only that direction: on 3.6.8, under load, a node has been seen
    to stay in Probe for more than 30 s while its peer saw it Up, and to
    get the peer's packets all the same."""
    wait_until(lambda: link_state(srv, node_id) == "Up", timeout,
               f"node {node_id}'s link to be up (seen as {link_state(srv, node_id)})",
               interval=0.1)


# ---- crafted packets: what a peer could send on the module's capability ----

CAPABILITY = b"event_virtual-repl"
HEALTH, VERSION = 1, 1


def field(f):
    """One field as bin_push_str / bin_push_int write it (x86: little
    endian); bytes given as-is go in raw (a malformed field)."""
    if isinstance(f, int):
        return struct.pack("<i", f)
    if isinstance(f, str):
        f = f.encode()
        return struct.pack("<H", len(f)) + f
    return bytes(f)


def bin_packet(fields, kind=HEALTH, version=VERSION, src=2, dst=1,
               cluster_id=CLUSTER_ID, capability=CAPABILITY):
    """A bin packet as bin_init and the clusterer's send build it: marker,
    total length, version, capability, type, fields, then the clusterer's
    trailer (cluster, source node, destination node)."""
    body = (struct.pack("<hH", version, len(capability)) + capability
            + struct.pack("<i", kind) + b"".join(field(f) for f in fields)
            + struct.pack("<iii", cluster_id, src, dst))
    return b"P4CK" + struct.pack("<I", 8 + len(body)) + body


def send_bin(port, packets):
    """Send packets to a node's bin: socket over one TCP connection, as a
    peer would (the clusterer checks the source node id and IP only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for p in packets:
            s.sendall(p)
        # let proto_bin read them before the connection closes
        time.sleep(0.2)
