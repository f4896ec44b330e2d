"""How much of this process's CPU cores other programs took (psutil)."""

from __future__ import annotations

import os
import time

# processes a student cannot close without losing the lesson: the browser that draws the
# figures and the Jupyter server that carries their messages (matched in the name or the
# command line, lower case)
FRONT_END = (
    "chrome",
    "chromium",
    "headless_shell",
    "firefox",
    "safari",
    "msedge",
    "opera",
    "brave",
    "vivaldi",
    "jupyter",
)


class CoreShare:
    """How many of the CPU cores this process may use other programs kept busy from the
    moment it is made: psutil's per-core busy time on those cores, less this process's own
    CPU time and the browser's and Jupyter's (FRONT_END: they draw what the run sends), over
    the wall time. A team of torch threads waits at every operation for its
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
        self._front_end: dict[int, float] = {}  # pid -> CPU time at the start
        self._start = (time.perf_counter(), self._busy(), self._own() + self._front(first=True))

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

    def _front(self, first: bool = False) -> float:
        """CPU time the browser's and Jupyter's processes used since the start (``first``:
        this is the start); a process first seen later (a new renderer) counts from zero."""
        used = 0.0
        for proc in self._psutil.process_iter(["name", "cmdline", "cpu_times"]):
            info = proc.info
            if proc.pid == self._proc.pid or info["cpu_times"] is None:
                continue
            if proc.pid not in self._front_end and not is_front_end(info["name"], info["cmdline"]):
                continue
            cpu = info["cpu_times"].user + info["cpu_times"].system
            start = self._front_end.setdefault(proc.pid, cpu if first else 0.0)
            used += cpu - start
        return used

    def others(self, min_wall: float = 1.0) -> float | None:
        """Cores' worth of CPU time other programs used since this object was made; None
        before ``min_wall`` seconds (the system's counters tick at 10 ms)."""
        t0, busy0, own0 = self._start
        wall = time.perf_counter() - t0
        if wall < min_wall:
            return None
        ours = self._own() + self._front() - own0
        return max(0.0, ((self._busy() - busy0) - ours) / wall)


def is_front_end(name: str | None, cmdline: list[str] | None) -> bool:
    """Whether a process is part of what shows the lesson: a browser or Jupyter (FRONT_END)."""
    # the program and its first argument (a script run by an interpreter), not their folders
    words = [name or "", *(os.path.basename(arg) for arg in (cmdline or [])[:2])]
    text = " ".join(words).lower()
    return any(word in text for word in FRONT_END)
