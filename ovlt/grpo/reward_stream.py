"""Rewards scored while generation still runs.

The rollout engine calls `on_complete(request_index, completion)` as each completion finishes;
the trainer hands the graded text to a `RewardStream`, whose one background thread feeds the
reward pool with whatever has arrived (one `advantages.score` call per batch of arrivals: the
very grading of a batch-scored step), so the grading overlaps decoding and only the last
completions' grading is left after the rollout.
The pool is used by that thread alone while the stream is open. Results are keyed by
(request index, graded text): the same text for the same prompt always gets the same reward,
so the caller needs no completion identity, only what it grades.
"""
from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from ovlt.grpo.advantages import score

_DONE = object()


class RewardStream:
    """Submit (key, text, answer) from any thread while the rollout runs; `results()` waits
    for the rest and returns {key: (reward, accuracy)}. A key submitted twice is graded once."""

    def __init__(self, pool, rcfg):
        self.pool, self.rcfg = pool, rcfg
        self._q: queue.Queue = queue.Queue()
        self._out: dict = {}
        self._seen: set = set()
        self._error: BaseException | None = None
        self.batches = 0  # pool calls made (how the arrivals were batched)
        self._thread = threading.Thread(target=self._run, name="ovlt-reward-stream", daemon=True)
        self._thread.start()

    def submit(self, key, text: str, answer: str) -> None:
        self._q.put((key, text, answer))

    def _run(self) -> None:
        done = False
        while not done:
            items = [self._q.get()]
            while True:  # everything that has arrived meanwhile, in one pool call
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            done = any(it is _DONE for it in items)
            todo = []
            for it in items:
                if it is not _DONE and it[0] not in self._seen:
                    self._seen.add(it[0])
                    todo.append(it)
            if not todo or self._error is not None:
                continue
            try:
                rewards, accs = score(self.pool, [SimpleNamespace(text=t, answer=a)
                                                  for _, t, a in todo], self.rcfg)
                self.batches += 1
            except BaseException as e:  # noqa: BLE001 - re-raised in results()
                self._error = e
                continue
            for (key, _, _), rw, acc in zip(todo, rewards, accs):
                self._out[key] = (rw, acc)

    def close(self) -> None:
        """Stop the thread once what was submitted is graded (idempotent)."""
        if self._thread.is_alive():
            self._q.put(_DONE)
            self._thread.join()

    def results(self) -> dict:
        """Close the stream: wait for every submitted item; {key: (reward, accuracy)}."""
        self.close()
        if self._error is not None:
            raise RuntimeError(f"reward scoring failed: {type(self._error).__name__}: "
                               f"{self._error}") from self._error
        return self._out
