"""How many cores the server may give its worker threads and processes."""

from __future__ import annotations

import os


def cores_but_one() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one, else
    the machine's), less one left to the event loop; at least 1."""
    usable = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return max(1, usable - 1)
