"""RewardPool: per-item timeout, crash recovery, no leaked processes."""
import multiprocessing as mp
import os
import signal
import time

import pytest

from ovlt.rewards import RewardPool, math_reward

HERE = "tests.procs.test_rewards_pool"


# Graders run in spawned workers, so they are module-level functions named "module:function".
def grader_hangs_on(response, ground_truth):
    if response == "hang":
        time.sleep(600)  # a grader stuck in C code would look the same from outside
    if response == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if response == "raise":
        raise RuntimeError("grader bug")
    return 1.0 if response == ground_truth else 0.0


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); a reaped child does not
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_pool_matches_in_process_math_reward():
    responses = ["<answer>3</answer>", "<answer>\\frac{1}{2}</answer>", "\\boxed{7}", "nothing",
                 "<answer>(B) 3</answer>", "<answer>x^2+2x+1</answer>"]
    truths = ["3", "0.5", "8", "1", "B", "(x+1)^2"]
    expected = [math_reward(r, t) for r, t in zip(responses, truths)]
    assert expected == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    with RewardPool(num_workers=2, timeout_s=30) as pool:
        assert pool.score(responses, truths) == expected
        assert pool.score(["<answer>(1,3)</answer>"], ["(1,2)"], partial_credit=0.5) == [0.5]
        assert pool.stats.items == 7 and pool.stats.timeouts == 0


def test_hanging_grader_times_out_scores_zero_and_pool_recovers():
    # Children other tests left in this process (e.g. megatron-core's checkpoint-writer
    # Manager, a process-wide singleton) are not the pool's to reap.
    others = {p.pid for p in mp.active_children()}
    with RewardPool(num_workers=2, timeout_s=1.0, fn=f"{HERE}:grader_hangs_on") as pool:
        pids_before = pool.pids()
        t = time.monotonic()
        out = pool.score(["a", "hang", "b", "hang", "c"], ["a", "hang", "x", "hang", "c"])
        elapsed = time.monotonic() - t
        assert out == [1.0, 0.0, 0.0, 0.0, 1.0]
        assert pool.stats.timeouts == 2 and pool.stats.items == 5
        assert elapsed < 60  # two 1 s timeouts (+ worker restarts), never the 600 s sleep
        # The hung workers were killed and reaped; the pool keeps working with new ones.
        assert pool.score(["z"], ["z"]) == [1.0]
        assert pool.stats.restarts >= 1
        killed = [p for p in pids_before if p not in pool.pids()]
        assert killed and not any(_alive(p) for p in killed)
        pids = pool.pids()
    assert not any(_alive(p) for p in pids)
    assert [p for p in mp.active_children() if p.pid not in others] == []


def test_worker_killed_from_outside_is_replaced():
    with RewardPool(num_workers=1, timeout_s=30, fn=f"{HERE}:grader_hangs_on") as pool:
        assert pool.score(["a"], ["a"]) == [1.0]
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert pool.score(["b", "c"], ["b", "x"]) == [1.0, 0.0]
        assert pool.pids() != [pid]
        assert pool.stats.restarts == 1


def test_item_that_kills_its_worker_scores_zero_after_one_retry():
    with RewardPool(num_workers=1, timeout_s=30, fn=f"{HERE}:grader_hangs_on") as pool:
        assert pool.score(["a", "die", "b"], ["a", "die", "b"]) == [1.0, 0.0, 1.0]
        assert pool.stats.crashes == 1 and pool.stats.restarts == 2  # retried once, then zero


def test_grader_exception_scores_zero_and_is_counted():
    with RewardPool(num_workers=1, timeout_s=30, fn=f"{HERE}:grader_hangs_on") as pool:
        assert pool.score(["raise", "a"], ["raise", "a"]) == [0.0, 1.0]
        assert pool.stats.errors == 1 and pool.stats.restarts == 0


def test_close_stops_workers_and_rejects_further_use():
    pool = RewardPool(num_workers=2, timeout_s=5)
    pids = pool.pids()
    assert all(_alive(p) for p in pids)
    pool.close()
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], ["a"])
    pool.close()  # idempotent


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(timeout_s=0)
    with pytest.raises((ImportError, AttributeError)):
        RewardPool(fn="ovlt.rewards.math_reward:no_such_function")
    with RewardPool(num_workers=1) as pool, pytest.raises(ValueError, match="ground truths"):
        pool.score(["a"], [])


def test_pool_from_config_uses_reward_settings():
    from ovlt.config import RewardConfig
    from ovlt.rewards import reward_kwargs
    cfg = RewardConfig(partial_credit=0.5, format_weight=0.1, timeout_s=10.0, num_workers=1,
                       fallback="last_number")
    responses = ["<think>r</think><answer>(1,3)</answer>", "it is 7", "<think>r</think><answer>7</answer>"]
    with RewardPool.from_config(cfg) as pool:
        out = pool.score(responses, ["(1,2)", "7", "8"], **reward_kwargs(cfg))
    # 0.9 * 0.5 (partial) + 0.1 (format); 0.9 * 1 (fallback number, no format); 0 + 0.1
    assert out == pytest.approx([0.55, 0.9, 0.1], abs=1e-12)


def test_worker_that_cannot_start_raises_clearly(monkeypatch):
    pool = RewardPool(num_workers=1, timeout_s=5, fn=f"{HERE}:grader_hangs_on")
    try:
        (w,) = pool._workers
        w.proc.kill()  # dies before saying "ready"
        w.proc.join()
        pool._workers[0].task = None
        # the dead worker is replaced (not an error): start-up failures only raise when the
        # replacement itself cannot start
        assert pool.score(["a"], ["a"]) == [1.0]
    finally:
        pool.close()
    bad = RewardPool(num_workers=1, timeout_s=5, fn=f"{HERE}:grader_hangs_on")
    try:
        bad.fn = "tests.no_such_module:f"  # what a worker would see if the module vanished
        bad._workers[0].kill()
        with pytest.raises(RuntimeError, match="failed to start: ModuleNotFoundError"):
            bad.score(["a"], ["a"])
    finally:
        bad.close()
