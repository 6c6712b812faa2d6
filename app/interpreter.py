"""Process-wide interpreter settings while the service runs: the GIL switch interval and the garbage collector.

Both are set when the service starts and restored when it stops (a test process builds many apps).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from app.settings import Settings

_serving = 0  # services inside tuned(): only they freeze the heap


@contextmanager
def tuned(settings: Settings) -> Iterator[None]:
    """The GIL switch interval from the settings, and a young-generation threshold that a request's own
    temporaries do not reach: a /score request holds ≈ 600 containers at once (its candidates, their dicts),
    so Python's default of 700 ran a collection on every request, and a full one every ≈ 500 requests over
    the 78k objects of the loaded models (≈ 0.15 ms per request in all, bench/README.md)."""
    global _serving
    switch_interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1e3)
    gc.set_threshold(settings.gc_young_threshold, *thresholds[1:])
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
