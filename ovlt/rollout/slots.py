"""Host-side bookkeeping of the built-in engine's decode slots (continuous batching).

A generate call queues its samples (request i, sample j) in request order. Each of the
engine's S slots decodes one sample at a time; when samples finish, their slots take the next
waiting samples at once. A slot's KV rows keep the prompt's prefix (positions [0, P - 1)) until
the slot is given to another prompt, so the `n` samples of a prompt share ONE prefill: the
first slot of a prompt is prefilled, its siblings copy the prefix from a slot that holds it
(or keep it in place when a finished sibling's slot is refilled by the same prompt).

Why a copy always has a source: samples leave the queue in order, so a prompt's waiting
samples are at its head; a prompt's finished slots are handed back to that prompt first (in
place), and a slot holding prompt i's prefix goes to another prompt only once i has no
waiting samples. `plan` still checks every source and prefills again if one is missing.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RefillPlan:
    assign: list[tuple[int, int, int]] = field(default_factory=list)   # (slot, request, sample)
    copies: list[tuple[int, int, int]] = field(default_factory=list)   # (dst, src, request)
    prefill: dict[int, list[int]] = field(default_factory=dict)        # request -> dst slots
    in_place: list[int] = field(default_factory=list)                  # slots keeping their prefix


class SlotTable:
    def __init__(self, n_slots: int, n_requests: int, n_samples: int):
        self.queue: deque[tuple[int, int]] = deque(
            (i, j) for i in range(n_requests) for j in range(n_samples))
        self.owner: list[Optional[tuple[int, int]]] = [None] * n_slots   # sample decoding
        self.prefix_of: list[Optional[int]] = [None] * n_slots           # request whose prefix
        self.homes: dict[int, set[int]] = {}                              # request -> slots

    def free_slots(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o is None]

    def busy(self) -> bool:
        return any(o is not None for o in self.owner)

    def release(self, slot: int) -> tuple[int, int]:
        """The slot's sample finished: the slot is free (its prefix stays for reuse)."""
        who = self.owner[slot]
        if who is None:
            raise RuntimeError(f"slot {slot} released twice")
        self.owner[slot] = None
        return who

    def move(self, src: int, dst: int) -> None:
        """A decoding sample moved from slot `src` to the free slot `dst` (its KV copied)."""
        if self.owner[src] is None or self.owner[dst] is not None:
            raise RuntimeError(f"cannot move slot {src} ({self.owner[src]}) to slot {dst} "
                               f"({self.owner[dst]})")
        i = self.owner[src][0]
        for s, new in ((dst, i), (src, None)):
            old = self.prefix_of[s]
            if old is not None:
                self.homes[old].discard(s)
            self.prefix_of[s] = new
            if new is not None:
                self.homes.setdefault(new, set()).add(s)
        self.owner[dst], self.owner[src] = self.owner[src], None

    def plan(self, free: list[int]) -> RefillPlan:
        """Give free slots to the next waiting samples, and record the new owners."""
        plan = RefillPlan()
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not take:
            return plan
        pending: dict[int, list[int]] = {}
        for i, j in take:
            pending.setdefault(i, []).append(j)
        avail = list(free)
        # 1) a prompt's own free slots first: its prefix is already there
        for i, js in pending.items():
            for s in sorted(self.homes.get(i, ())):
                if js and s in avail:
                    avail.remove(s)
                    plan.assign.append((s, i, js.pop(0)))
                    plan.in_place.append(s)
        # 2) the others: copy from a slot holding the prefix, else prefill
        taken = {s: i for s, i, _ in plan.assign}
        for i, js in pending.items():
            for j in js:
                s = avail.pop(0)
                taken[s] = i
                plan.assign.append((s, i, j))
                # a source must not be overwritten by another prompt in this refill (copies
                # run in plan order, before any prefill writes)
                srcs = [h for h in sorted(self.homes.get(i, ())) if taken.get(h, i) == i and h != s]
                if srcs:
                    plan.copies.append((s, srcs[0], i))
                else:
                    plan.prefill.setdefault(i, []).append(s)
        for s, i, j in plan.assign:
            old = self.prefix_of[s]
            if old is not None and old != i:
                self.homes[old].discard(s)
            self.prefix_of[s] = i
            self.homes.setdefault(i, set()).add(s)
            self.owner[s] = (i, j)
        return plan
