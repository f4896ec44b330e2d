"""Process tuning for CPU training: OpenMP worker threads and glibc's malloc.

Neither changes a result; both keep a CPU step from paying for the operating system's work.
The figures behind them are in BENCHMARKS.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading

import torch

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# blocks up to this size come from the heap, not a fresh mmap; the heap's free top is given
# back to the system only above the trim threshold
MALLOC_MMAP_THRESHOLD = 256 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20
# set before a process starts (make lab, test and bench do): every thread allocates from the
# main arena, which keeps what it frees; see keep_freed_memory
MALLOC_TUNABLES = "glibc.malloc.arena_max=1"


def free_openmp_threads() -> bool:
    """Free the main thread's idle OpenMP worker threads (libgomp's ``omp_pause_resource_all``,
    OpenMP 5.0). Call it before training in another thread on a CPU, as a widget does; called
    from any other thread it does nothing.

    Why: each thread that runs torch's parallel CPU ops gets an OpenMP team of its own. Once the
    main thread has a team, a training thread's team makes libgomp manage more threads than
    there are cores, and it stops spin-waiting between parallel regions: every small op pays a
    sleep and a wake-up. True where it freed them; False off the main thread, where the OpenMP
    runtime is not libgomp, or where the call failed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    # a list, not any() over a generator: every libgomp is paused, not just the first
    return any([lib.omp_pause_resource_all(1) == 0 for lib in _libgomps()])  # omp_pause_soft


@functools.cache
def _libgomps() -> tuple:
    """Every libgomp loaded in this process that has omp_pause_resource_all (Linux, from
    /proc/self/maps, looked up once), torch's own first: another library may bring its own."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libgomp" in ln and "/" in ln}
    except OSError:
        return ()
    torch_dir = os.path.dirname(torch.__file__)
    libs = []
    for path in sorted(paths, key=lambda q: (not q.startswith(torch_dir), q)):
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all.restype = ctypes.c_int  # absent before OpenMP 5.0
        except (OSError, AttributeError):
            continue
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        libs.append(lib)
    return tuple(libs)


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the memory a training step frees instead of handing it back to
    the system and faulting it in again at the next step (``mallopt``; once per process).

    Why: a CPU step allocates and frees activations and gradients of a few MB each. With its
    self-adjusting thresholds glibc may serve blocks that large with mmap, or trim the heap's
    free top, and then every step maps fresh pages and zero-fills them. After this, freed
    blocks stay in the heap and the process keeps its peak use until it exits. A worker
    thread's own arena still maps large blocks afresh whatever the thresholds: only one arena
    for all threads avoids that, which glibc reads when a process starts (MALLOC_TUNABLES, set
    by make lab, test and bench).

    True where it was set; False where malloc is not glibc's (macOS, musl), or
    LESSONS_KEEP_MEMORY=0."""
    if os.environ.get("LESSONS_KEEP_MEMORY", "") in ("0", "false", "no"):
        return False
    if platform.libc_ver()[0] != "glibc":  # another C library's mallopt means other things
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # both: either alone turns off glibc's own adjustment of the other
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )
