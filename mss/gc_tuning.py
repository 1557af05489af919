"""The garbage collector's settings for a serving process (the gateway's, a replica's).

`tune_gc` runs once per process, when what it loaded at start (modules, the
app, the engine) is in place and before it serves.
"""

from __future__ import annotations

import gc

GC_YOUNG_THRESHOLD = 10_000
"""Allocations between young-generation collections (Python's default: 700)."""
GC_MIDDLE_THRESHOLD = 100
"""Young collections between two of the middle generation (Python's default: 10). What a
young pass leaves alive is mostly requests in flight, about 60 objects each in the gateway,
which reference counting frees once they end; a pass over the middle generation scans those
still running (15-33 ms at a thousand streams), so it runs a tenth as often."""


def tune_gc() -> None:
    """Keep what exists now out of every collection; collect the younger generations less often.

    A collection pass stalls every stream for milliseconds, and the objects made
    per token die young by reference counting, so frequent young collections buy
    nothing; the modules, app, settings and engine live as long as the process,
    so scanning them is pure cost. A replica's process holds more than 600,000
    of them once vLLM is loaded: without this, each full pass stalls its event
    loop for a few hundred milliseconds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, 10)
