"""Checking a numeric exercise answer without showing the solution.

An exercise cell computes the expected value from the library and hands it to
``answer_checker``; the student calls the returned ``check`` with their own number and reads
"right" or how far off it is, never the expected value itself. Plain ``print`` only, so it
works wherever a notebook runs, with or without a widget front end.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable


def _as_number(value) -> float | None:
    """value as a finite float, or None where it is not a real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # numpy scalars and 0-d arrays are Real or convert cleanly; anything else is not a number
        try:
            if getattr(value, "shape", None) != ():
                return None
            value = value.item()
        except (AttributeError, ValueError, TypeError):
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def _percent(fraction: float) -> str:
    pct = round(100 * fraction, 1)
    return f"{pct:.1f}%" if pct < 10 else f"{pct:.0f}%"


def answer_checker(expected, rel: float = 0.02, unit: str = "") -> Callable[[object], bool]:
    """A ``check(answer)`` that prints "right" when answer is within ``rel`` (relative) of
    ``expected``, else "off by N% (too high)" or "(too low)", and returns True or False.
    ``unit`` names what the number counts (steps, samples) in the messages."""
    target = _as_number(expected)
    if target is None or target == 0:
        raise ValueError(f"expected must be a finite nonzero number, got {expected!r}")
    if not (isinstance(rel, int | float) and 0 < rel < 1):
        raise ValueError(f"rel must be a fraction in (0, 1), got {rel!r}")
    what = f" ({unit})" if unit else ""

    def check(answer) -> bool:
        value = _as_number(answer)
        if value is None:
            print(f"{answer!r} is not a number: call check with your answer{what}, e.g. check(12)")
            return False
        off = (value - target) / abs(target)
        if abs(off) <= rel:
            print(f"right: {value:g}{' ' + unit if unit else ''}")
            return True
        print(f"off by {_percent(abs(off))} ({'too high' if off > 0 else 'too low'})")
        return False

    return check
