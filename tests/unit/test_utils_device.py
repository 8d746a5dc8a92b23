"""`HostCopy` and `StepClock` (ovlt.utils.device): reading a step's numbers and timing it
without draining the GPU stream."""
import time

import pytest
import torch

from ovlt.utils.device import HostCopy, StepClock

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cycles(seconds: float) -> int:
    """GPU clock cycles for `torch.cuda._sleep` to spin about `seconds` (measured here)."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    return int(10_000_000 * seconds / (a.elapsed_time(b) / 1e3))


def test_host_copy_cpu_holds_the_values_at_creation():
    t = torch.tensor([1.0, 2.5, -3.0], dtype=torch.float64)
    c = HostCopy(t)
    t.add_(10)
    assert c.tolist() == [1.0, 2.5, -3.0]


def test_step_clock_cpu_is_wall_time_and_chains():
    a = StepClock("cpu").start()
    time.sleep(0.02)
    b = StepClock("cpu").start()
    time.sleep(0.01)
    b.stop()
    assert 0.02 <= a.seconds(until=b) < 0.5
    assert 0.01 <= b.seconds() < 0.5


@cuda
def test_host_copy_waits_for_earlier_work_only():
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    torch.cuda._sleep(_cycles(0.05))          # work before the copy: waited for
    c = HostCopy(x * 2)
    torch.cuda._sleep(_cycles(0.5))           # work queued after it: not waited for
    later = torch.cuda.Event()
    later.record()
    t0 = time.perf_counter()
    assert c.tolist() == [0.0, 2.0, 4.0, 6.0]
    waited = time.perf_counter() - t0
    assert not later.query() and waited < 0.4, waited
    torch.cuda.synchronize()


@cuda
def test_step_clock_counts_an_idle_gpu_not_earlier_work():
    torch.cuda.synchronize()
    idle = StepClock("cuda").start()
    time.sleep(0.1)                            # the GPU waits for the host: counted
    torch.ones(8, device="cuda").sum()
    idle.stop()
    assert 0.09 <= idle.seconds() < 0.5
    torch.cuda._sleep(_cycles(0.3))           # queued before the span: not counted
    busy = StepClock("cuda").start()
    torch.ones(8, device="cuda").sum()
    busy.stop()
    assert busy.seconds() < 0.05
