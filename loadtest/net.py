"""What every harness here needs from the network: free local ports, and a Prometheus
endpoint read into numbers."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_ports(n: int) -> list[int]:
    """``n`` distinct local ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` on ``port``: (name without ``_total``, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removesuffix("_total")  # the parser adds it to every counter
            out[(name, tuple(sorted(s.labels.items())))] = s.value
    return out
