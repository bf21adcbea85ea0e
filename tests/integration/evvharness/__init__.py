"""Harness of the event_virtual integration tests (and of bench/bench.py).

Everything talks to a real OpenSIPS over loopback only:

  env         OPENSIPS_SRC, EVV_MODULE (read from the environment here
              only) and the prerequisite check
  server      OpenSips: generated opensips.cfg, the process, its log, MI
              calls, SIP requests whose script raises events in workers
  mi          the MI client: the official `opensips.mi`, wrapped thinly
  sip         the SIP request builder (tests and bench)
  receivers   what UDP / unix datagram / flatstore / JSON-RPC subscribers got
  cluster     two servers in one OpenSIPS cluster (clusterer, proto_bin)
  checks      virtual socket strings, raise_one, absence and once-only checks
  broker      a throw-away RabbitMQ broker
  processes   spawning in a process group that dies with the run, stopping it
  util        wait_until (every wait is a condition with a deadline, or with
              progress), ports
"""

from . import cluster
from .broker import BrokerError, RabbitMQBroker
from .checks import (Raiser, assert_each_once, assert_quiet, raise_one, seq_of, seqs_of,
                     sweep, virtual, wait_shm_back, who_got)
from .env import EVV_MODULE, OPENSIPS_SRC, check_prerequisites
from .mi import MIError, ServerDied
from .receivers import Receivers, identity, tag_of
from .server import CLUSTER_STATS, EVENT_POOL, SPOOL_STATS, VIRTUAL_STATS, OpenSips, crash_lines, stats_delta
from .sip import sip_request
from .util import DEFAULT_TIMEOUT, closed_tcp_port, free_port, wait_until, wait_while_moving
