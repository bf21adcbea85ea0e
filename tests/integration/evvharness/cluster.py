"""A cluster of OpenSIPS servers on loopback, tied by OpenSIPS's clusterer
(db_mode 0, my_node_info / neighbor_node_info) over a bin: socket each
(proto_bin): the OpenSips options of each node, and the wait for the links."""

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


def link_state(srv, node_id):
    """clusterer_list on srv: the link state of node_id ("Up", "Down", ...)."""
    for c in srv.mi("clusterer_list").get("Clusters", []):
        for n in c.get("Nodes", []):
            if n.get("node_id") == node_id:
                return n.get("link_state")
    return None


def wait_linked(a, a_id, b, b_id, timeout=15):
    wait_until(lambda: link_state(a, b_id) == "Up" and link_state(b, a_id) == "Up", timeout,
               f"the cluster link between nodes {a_id} and {b_id}", interval=0.1)
