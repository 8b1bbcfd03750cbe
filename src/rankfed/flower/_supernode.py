"""``flower-supernode`` with a heartbeat interval of its own (``LocalDeployment(heartbeat_interval=...)``).

::

    python -m rankfed.flower._supernode SECONDS [flower-supernode arguments ...]

A Flower 1.41 SuperNode declares a heartbeat interval of 30 s (a constant, no command-line
flag) and sends a heartbeat about every 20 s; the SuperLink takes it for gone 2 intervals
after its last one, so a crashed SuperNode is noticed 40-60 s after it died, and a round
waiting for its reply waits that long. The SuperLink accepts any interval from 10 s to 30 min
that a SuperNode declares; Flower's SuperNode reads the interval from the module globals set
here each time it sends or declares it, so setting them before it starts gives it that
interval (at 10 s: noticed 15-20 s after it died). For local deployments (tests, benchmarks).
"""

from __future__ import annotations

import sys

from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode.cli import flower_supernode

MIN_INTERVAL, MAX_INTERVAL = 10.0, 1800.0  # what Flower 1.41's SuperLink accepts (HEARTBEAT_MIN/MAX_INTERVAL)


def main() -> int:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m rankfed.flower._supernode SECONDS [flower-supernode arguments ...]")
    seconds = float(sys.argv[1])
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise SystemExit(f"heartbeat interval {seconds} s: must be in [{MIN_INTERVAL:.0f}, {MAX_INTERVAL:.0f}] (what the SuperLink accepts)")
    for module in (heartbeat, fleet_http_connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):  # another Flower than the pinned 1.41
            raise SystemExit(f"{module.__name__} has no HEARTBEAT_DEFAULT_INTERVAL: this Flower ({getattr(sys.modules['flwr'], '__version__', '?')}) cannot be given a heartbeat interval")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
