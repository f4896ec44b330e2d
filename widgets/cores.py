"""How much of this process's CPU cores other programs took (psutil)."""

from __future__ import annotations

import time


class CoreShare:
    """How many of the CPU cores this process may use other programs kept busy from the
    moment it is made: psutil's per-core busy time on those cores, less this process's own
    CPU time, over the wall time. A team of torch threads waits at every operation for its
    slowest member, so another program on one of their cores can slow every step many times
    (BENCHMARKS.md)."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        proc = psutil.Process()
        try:
            allowed = sorted(proc.cpu_affinity())  # Linux, Windows
        except (AttributeError, psutil.Error, OSError):
            allowed = list(range(psutil.cpu_count() or 1))
        self.cores = len(allowed)
        self._allowed = allowed
        self._proc = proc
        self._start = (time.perf_counter(), self._busy(), self._own())

    def _busy(self) -> float:
        times = self._psutil.cpu_times(percpu=True)
        total = 0.0
        for i in self._allowed:
            if i < len(times):
                t = times[i]._asdict()
                # guest time is already counted in user time (Linux)
                idle = sum(t.get(k, 0.0) for k in ("idle", "iowait", "guest", "guest_nice"))
                total += sum(t.values()) - idle
        return total

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def others(self, min_wall: float = 1.0) -> float | None:
        """Cores' worth of CPU time other programs used since this object was made; None
        before ``min_wall`` seconds (the system's counters tick at 10 ms)."""
        t0, busy0, own0 = self._start
        wall = time.perf_counter() - t0
        if wall < min_wall:
            return None
        return max(0.0, ((self._busy() - busy0) - (self._own() - own0)) / wall)
