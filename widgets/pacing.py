"""How often a live figure redraws while a run streams in: at once after a slider move, then
less often as the run ages, so that a long run costs the browser a bounded number of
re-renders, and never so often that drawing takes more than a fifth of the kernel's time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RedrawPacing:
    """The redraw interval of one LiveRun (``LiveRun.pacing``).

    throttle: False redraws for every record (widgets.bench's baseline); age_share: the
    interval grows by this share of the time since the request's first record; started:
    that time (None until the first record); draw_cost: seconds the last redraw took."""

    throttle: bool = True
    age_share: float = 1 / 20
    started: float | None = None
    draw_cost: float = 0.0

    def restart(self) -> None:
        """A new request: its first record starts the clock again."""
        self.started = None

    def interval(self, now: float, min_interval: float, max_interval: float) -> float:
        """Seconds to wait between redraws at ``now``: ``min_interval`` at first, then
        age_share of the request's age up to ``max_interval`` (the figure's bounds), and never
        less than 4x the last redraw's cost."""
        if not self.throttle:
            return 0.0
        if self.started is None:
            self.started = now
        grown = (now - self.started) * self.age_share
        return max(min(max_interval, max(min_interval, grown)), 4 * self.draw_cost)
