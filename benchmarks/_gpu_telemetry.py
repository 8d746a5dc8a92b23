"""SM clock, power and temperature sampled in the background while a benchmark runs, so its
step times can be laid next to what the GPU's clocks did (a slow step: the code, or a clock
that dropped?). Samples come from `nvidia-smi -lms`, each stamped with the host clock on
arrival; without nvidia-smi (CPU runs) there are none."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
import time


class GpuTelemetry:
    FIELDS = ("sm_mhz", "power_w", "temp_c")

    def __init__(self, device_uuid: str, period_ms: int = 100):
        """`device_uuid`: the GPU to follow (torch's `get_device_properties(d).uuid`, with or
        without nvidia-smi's "GPU-" prefix); on a one-GPU machine its lines are taken whatever
        the spelling."""
        self._want = _norm_uuid(device_uuid)
        self._by_uuid: dict[str, list] = {}  # GPU -> [(host time, *FIELDS)]
        self._proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None or period_ms <= 0:
            return
        self._proc = subprocess.Popen(
            [exe, "--query-gpu=uuid,clocks.sm,power.draw,temperature.gpu",
             "--format=csv,noheader,nounits", "-lms", str(period_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            uuid, _, rest = line.partition(",")
            row = parse_sample(rest)
            if row is not None:
                self._by_uuid.setdefault(_norm_uuid(uuid), []).append((time.time(), *row))

    @property
    def samples(self) -> list:
        """The followed GPU's samples so far: (host time, sm MHz, W, deg C)."""
        if self._want in self._by_uuid:
            return self._by_uuid[self._want]
        only = list(self._by_uuid.values())
        return only[0] if len(only) == 1 else []

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)
            self._proc = None


def _norm_uuid(u: str) -> str:
    u = u.strip().lower()
    return u[4:].replace("-", "") if u.startswith("gpu-") else u.replace("-", "")


def parse_sample(line: str):
    """(sm MHz, W, deg C) from one `nvidia-smi --format=csv,noheader,nounits` line, or None
    (a field reads "[N/A]" on some boards)."""
    parts = [p.strip() for p in line.split(",")]
    try:
        return tuple(float(p) for p in parts[:3]) if len(parts) >= 3 else None
    except ValueError:
        return None


def per_step(samples: list, step_ends: list[float]) -> dict:
    """Each field's mean over the samples that arrived within each step: step k spans
    (step_ends[k - 1], step_ends[k]] on the host clock; the first step starts at step_ends[0]'s
    predecessor, so `step_ends` has one more entry than there are steps. Steps without a sample
    get None."""
    out = {f: [] for f in GpuTelemetry.FIELDS}
    out["samples"] = []
    for lo, hi in itertools.pairwise(step_ends):
        inside = [s for s in samples if lo < s[0] <= hi]
        out["samples"].append(len(inside))
        for i, f in enumerate(GpuTelemetry.FIELDS, start=1):
            out[f].append(round(sum(s[i] for s in inside) / len(inside), 1) if inside else None)
    return out
