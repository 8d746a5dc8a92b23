"""GCSchedule: automatic collection off inside, collections at the scheduled steps only, the
collector restored on exit (also through an error)."""
import gc
import weakref

import pytest

from ovlt.config import ConfigError, JobConfig, validate
from ovlt.engine.gc_schedule import GCSchedule


class _Node:
    pass


def _garbage_cycle() -> weakref.ref:
    """A reference cycle nothing else points to: only the cycle collector frees it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_cycles_are_freed_at_the_scheduled_steps_only():
    with GCSchedule(3) as sched:
        assert not gc.isenabled()
        alive = _garbage_cycle()
        for _ in range(2000):  # allocations that would trip an automatic collection
            _garbage_cycle()
        sched.tick(1)
        sched.tick(2)
        assert alive() is not None
        sched.tick(3)
        assert alive() is None
        assert sched.collections == 1
        alive = _garbage_cycle()
        sched.tick(4)
        assert alive() is not None
        sched.tick(6)
        assert alive() is None and sched.collections == 2
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0  # the objects frozen at entry are collectable again


def test_interval_zero_leaves_the_collector_alone():
    with GCSchedule(0) as sched:
        assert gc.isenabled()
        sched.tick(50)
        assert sched.collections == 0
    gc.disable()
    with GCSchedule(0):
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_collector_restored_after_an_error_and_kept_off_when_it_was_off():
    with pytest.raises(RuntimeError):
        with GCSchedule(2):
            raise RuntimeError("step failed")
    assert gc.isenabled()
    gc.disable()
    with GCSchedule(2):
        pass
    assert not gc.isenabled()


def test_negative_interval_refused():
    with pytest.raises(ValueError, match="gc interval must be >= 0"):
        GCSchedule(-1)
    cfg = JobConfig()
    cfg.sft.train.gc_interval = -5
    with pytest.raises(ConfigError, match=r"sft.train.gc_interval=-5: must be >= 0"):
        validate(cfg)


def test_refreeze_frees_cycles_of_objects_alive_at_entry():
    held = [_garbage_cycle()]  # stands for the model wrapper built before the loop
    node = held[0]()
    with GCSchedule(1) as sched:
        del node  # the loop replaces it: now cyclic garbage, but frozen at entry
        sched.tick(1)
        assert held[0]() is not None  # scheduled collections do not see frozen objects
        sched.refreeze()
        assert held[0]() is None
        assert gc.get_freeze_count() > 0  # what is alive now is frozen again
    assert gc.get_freeze_count() == 0
