"""The background worker behind a LiveRun, and the registry that interrupts stop.

One thread trains at a time: a new request stops the one in flight (its stop event is set,
and training ends within a step) and the newest request wins; requests that arrive meanwhile
replace each other. A request that stopped a run may be one of a burst (an arrow key pressed
again and again): it starts only once ``settle_s`` has passed without a newer one. The thread
ends when nothing is pending and is started again by the next request. Nothing here knows about
widgets.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol


class Worker:
    """Runs ``execute(request, stop)`` for the newest request, one at a time, in one thread;
    an exception it raises goes to ``on_error`` and the thread goes on."""

    def __init__(
        self,
        execute: Callable[[Any, threading.Event], None],
        name: str,
        on_error: Callable[[Exception], None],
    ):
        self._execute = execute
        self._on_error = on_error
        self._name = name
        self._cond = threading.Condition()
        self._pending: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._burst = False  # the pending request stopped a request in flight
        self.settle_s = 0.3
        self.threads_started = 0

    def submit(self, request: Any) -> None:
        """Run ``request`` next: the one in flight is told to stop, the newest wins."""
        with self._cond:
            self._burst = self._burst or self.busy
            self._pending = request
            self._stop.set()
            self._idle.clear()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name=self._name)
                self.threads_started += 1
                self._thread.start()
            self._cond.notify_all()

    def stop(self) -> None:
        """Stop the request in flight and drop the pending one."""
        with self._cond:
            self._pending = None
            self._stop.set()
            self._cond.notify_all()  # a request that settles stops waiting

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until nothing runs or is pending; False on timeout."""
        return self._idle.wait(timeout)

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    @property
    def superseded(self) -> bool:
        """A newer request waits: the one in flight was stopped to make way for it."""
        return self._pending is not None

    def _next(self) -> tuple[Any, threading.Event | None]:
        """The request to run and its stop event; (None, None) when nothing is pending (the
        thread then ends). In a burst, each request waits ``settle_s`` for a newer one."""
        with self._cond:
            while self._pending is not None:
                request, self._pending = self._pending, None
                self._stop = stop = threading.Event()
                burst, self._burst = self._burst, False
                if not (burst and self._cond.wait_for(stop.is_set, timeout=self.settle_s)):
                    return request, stop
                # replaced (or stopped) while it settled: take the newer one, if any
            self._thread = None
            self._idle.set()
            return None, None

    def _loop(self) -> None:
        while True:
            request, stop = self._next()
            if stop is None:
                return
            try:
                self._execute(request, stop)
            except Exception as e:  # the thread must survive anything a run does
                self._on_error(e)


# --------------------------------------------------------------------------- interrupts
class Stoppable(Protocol):
    busy: bool

    def stop(self) -> None: ...


# Every live widget, by name: a re-run widget cell replaces (and stops) the old widget, and a
# kernel interrupt stops them all.
_LIVE: weakref.WeakValueDictionary[str, Stoppable] = weakref.WeakValueDictionary()


def register(name: str, live: Stoppable) -> None:
    """Make ``live`` the widget called ``name``: the one it replaces stops training."""
    old = _LIVE.get(name)
    if old is not None and old is not live:
        old.stop()
    _LIVE[name] = live


def stop_all() -> int:
    """Stop every run in flight, in every widget; returns how many were running."""
    busy = [live for live in list(_LIVE.values()) if live.busy]
    for live in busy:
        live.stop()
    return len(busy)


def _sigint_idle(signum, frame) -> None:
    stop_all()  # the kernel is idle: nothing else to interrupt


def _sigint_busy(signum, frame) -> None:
    stop_all()
    raise KeyboardInterrupt  # and the cell that is running stops as usual


def hook_kernel_interrupt() -> bool:
    """Make Jupyter's interrupt button stop the runs training in the background.

    ipykernel ignores SIGINT while idle (when a slider's run trains in a thread) and installs
    Python's default handler while a cell runs, restoring ``kernel.saved_sigint_handler``
    afterwards. So the idle handler goes into saved_sigint_handler, and the busy one into
    every cell through pre_handler_hook. Returns False outside an IPython kernel."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None or not hasattr(kernel, "pre_handler_hook"):
        return False
    if not getattr(kernel, "_lessons_interrupt_hooked", False):
        pre = kernel.pre_handler_hook

        def pre_handler_hook():
            pre()
            signal.signal(signal.SIGINT, _sigint_busy)

        kernel.pre_handler_hook = pre_handler_hook
        kernel._lessons_interrupt_hooked = True
    kernel.saved_sigint_handler = _sigint_idle
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _sigint_busy)  # the cell running now
    return True
