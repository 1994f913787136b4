"""Test support, shipped so that users' tests and benchmarks can use it too.

Synthetic papyrus-like volumes and segments (:mod:`.data`), and a loopback HTTP
server with latency, faults and request counts (:mod:`.server`).
"""

from .data import synthetic_ink, synthetic_papyrus, write_segment, write_tiff_stack
from .server import SlowServer, is_metadata

__all__ = ["synthetic_ink", "synthetic_papyrus", "write_segment", "write_tiff_stack", "SlowServer",
           "is_metadata"]
