"""pooled_proxy/daemon/runtime.py: the collector settings a serving process starts with."""

from __future__ import annotations

import gc

from pooled_proxy.daemon.runtime import GEN0_THRESHOLD, tune_gc_for_serving


def test_startup_objects_are_frozen_and_young_collections_are_rarer() -> None:
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GEN0_THRESHOLD, *before[1:])
        assert GEN0_THRESHOLD > before[0]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
