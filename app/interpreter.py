"""Process-wide interpreter settings while the service runs: the GIL switch interval and the garbage collector.

Both are set when the service starts and restored when it stops (a test process builds many apps).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# The inference thread takes the GIL back after every ONNX Runtime call; with Python's 5 ms the event loop,
# busy in Python, made it wait (c=1 p99 and saturation measured in bench/README.md).
GIL_SWITCH_INTERVAL_S = 0.5e-3
# A /score request holds ≈ 600 containers at once, so Python's default of 700 ran a young collection on every
# request and a full one over the loaded models every ≈ 500 (≈ 0.15 ms per request, bench/README.md).
GC_YOUNG_THRESHOLD = 20_000

_serving = 0  # services inside tuned(): only they freeze the heap


@contextmanager
def tuned() -> Iterator[None]:
    """The GIL switch interval and the young-generation threshold above, for as long as a service runs."""
    global _serving
    switch_interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *thresholds[1:])
    _serving += 1
    try:
        yield
    finally:  # restored however the service ends, a failed start included
        _serving -= 1
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(switch_interval)


def settle_heap() -> None:
    """Whenever a version is loaded (start-up included) or retired (app/registry.py): what the service holds
    lives until the next such change, so the collector stops walking it (``gc.freeze``); a full collection
    then looks at what requests left behind only. Unfrozen and collected first, so a retired version's
    reference cycles are freed rather than kept frozen. A full collection: tens of milliseconds, on changes
    only. Outside a service (a test building a registry alone) it does nothing."""
    if _serving:
        gc.unfreeze()
        gc.collect()
        gc.freeze()
