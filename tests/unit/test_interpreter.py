"""app/interpreter.py: the heap frozen while serving, and a retired version's cycles still freed."""

from __future__ import annotations

import gc
import weakref

from app import interpreter


class _Node:
    cycle: _Node


def test_settling_the_heap_frees_cycles_that_were_frozen() -> None:
    with interpreter.tuned():
        node = _Node()
        node.cycle = node  # what a retired model version leaves (app/scorer.py)
        alive = weakref.ref(node)
        interpreter.settle_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert alive() is not None  # frozen: an ordinary collection does not see it
        interpreter.settle_heap()  # what a load or a retirement does
        assert alive() is None
    assert gc.get_freeze_count() == 0


def test_outside_a_service_nothing_is_frozen() -> None:
    interpreter.settle_heap()
    assert gc.get_freeze_count() == 0
