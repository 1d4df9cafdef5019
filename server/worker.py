"""One worker of `rnnlm serve --processes N`: the normal server, started by the supervisor.

`python -m server.worker INDEX CONFIG_JSON` serves the configuration (`config_to_json`, with
--processes 1, the shared port and a free loopback metrics port) like `rnnlm serve`, with two
differences: its gRPC port is bound with SO_REUSEPORT, so that the N workers share it, and its
/metrics listens on 127.0.0.1 for the supervisor alone. When it serves it writes one status line
on stdout (`STATUS_PREFIX` and JSON: its pid and metrics port). It drains on SIGTERM like the
server, and gets SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so no worker outlives it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys

from server.app import RnnlmServer
from server.cli import serve, started
from server.config import ConfigError, ServerConfig, config_from_json

STATUS_PREFIX = "rnnlm-worker-status "
_PR_SET_PDEATHSIG = 1


def make_server(config: ServerConfig) -> RnnlmServer:
    return RnnlmServer(config, reuse_port=True, metrics_host="127.0.0.1")


def report_serving(server: RnnlmServer) -> None:
    status = {"pid": os.getpid(), "metrics_port": server.metrics_port}
    print(STATUS_PREFIX + json.dumps(status), flush=True)


def _stop_with_parent() -> None:
    """SIGTERM (a drain) when the supervisor dies; at once if it died before this ran."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m server.worker INDEX CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        config = config_from_json(argv[1])
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        print(f"rnnlm serve worker {argv[0]}: bad configuration: {str(e)[:200]}", file=sys.stderr)
        return 2
    _stop_with_parent()
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker {argv[0]} %(name)s: %(message)s",
    )
    return started(lambda: serve(config, make_server, report_serving), check=None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
