"""``python -m widgets.bench``: what one live run costs the browser.

Every message a widget would send to the front end (state updates and plotly's custom
messages both go through ``ipywidgets.Widget._send``) is counted, with its size, during one
default run of notebook 00's widget; the same run is then repeated with the redraw throttle
off (a redraw for every record fetched from the engine), measured in the same process as the
baseline. A run of about 10 s (the same widget, its epochs multiplied) is measured twice more
with plotly: with the redraw interval growing as the run ages (the default) and held at its
0.1 s start.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace

import ipywidgets as W

from lessons.profiles import get_profile


@contextmanager
def counting():
    """Count (and size) every message widgets send to the front end inside the block."""
    sent = {"messages": 0, "bytes": 0}
    original = W.Widget._send

    def _send(self, msg, buffers=None):
        sent["messages"] += 1
        sent["bytes"] += len(json.dumps(msg, default=str)) + sum(
            memoryview(b).nbytes for b in buffers or ()
        )
        return original(self, msg, buffers)

    W.Widget._send = _send
    try:
        yield sent
    finally:
        W.Widget._send = original


def measure(
    renderer: str, throttle: bool, profile: str | None, grow: bool = True, longer: int = 1
) -> dict:
    from widgets.start import start_here
    from widgets.worker import stop_all

    live = start_here(profile, renderer=renderer, replay=False)
    live.pacing.throttle = throttle
    if not grow:
        live.pacing.age_share = 0.0  # the interval stays at the figure's min_interval
    live.run_blocking(timeout=600)  # warm: data loaded, kernels compiled
    live.clear()
    if longer > 1:
        make = live.make_config

        def longer_config(v):
            config = make(v)
            return replace(config, epochs=config.epochs * longer)

        live.make_config = longer_config
    redraws = live.redraws
    with counting() as sent:
        t0 = time.perf_counter()
        run = live.run_blocking(timeout=1200, lr=live.values()["lr"] * 0.99)
        seconds = time.perf_counter() - t0
    records = sum(r.kind == "train" for r in run.records)
    stop_all()
    return {
        **sent,
        "redraws": live.redraws - redraws,
        "seconds": round(seconds, 2),
        "points": records,
    }


def run_bench(profile: str | None = None, renderers=("plotly", "matplotlib")) -> dict:
    result = {"profile": get_profile(profile).name, "cores": os.cpu_count()}
    for renderer in renderers:
        throttled = measure(renderer, True, profile)
        every = measure(renderer, False, profile)
        result[renderer] = {
            "throttled": throttled,
            "unthrottled": every,
            "message_ratio": round(every["messages"] / max(1, throttled["messages"]), 2),
            "messages_per_s": round(throttled["messages"] / throttled["seconds"], 1),
        }
    if "plotly" in renderers:
        longer = max(1, round(10 / result["plotly"]["throttled"]["seconds"]))  # about 10 s
        grown = measure("plotly", True, profile, longer=longer)
        fixed = measure("plotly", True, profile, grow=False, longer=longer)
        result["plotly_long_run"] = {
            "growing": grown,
            "fixed_min_interval": fixed,
            "message_ratio": round(fixed["messages"] / max(1, grown["messages"]), 2),
            "byte_ratio": round(fixed["bytes"] / max(1, grown["bytes"]), 2),
            "epochs_times": longer,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="gpu | cpu | ci (default: auto)")
    parser.add_argument("--renderer", choices=("plotly", "matplotlib"), default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    renderers = (args.renderer,) if args.renderer else ("plotly", "matplotlib")
    result = run_bench(args.profile, renderers)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"profile {result['profile']}, {result['cores']} cores: one default run of 00's widget")
    for renderer in renderers:
        r = result[renderer]
        for mode in ("throttled", "unthrottled"):
            m = r[mode]
            print(
                f"  {renderer:<10} {mode:<11} {m['messages']:>5} messages "
                f"{m['bytes'] / 1e3:>9.1f} kB {m['redraws']:>4} redraws "
                f"{m['points']:>5} points {m['seconds']:>6.2f} s"
            )
        print(f"  {renderer:<10} unthrottled/throttled messages: {r['message_ratio']}x")
    long = result.get("plotly_long_run")
    if long:
        print(f"  a run {long['epochs_times']}x as long, plotly:")
        for mode in ("growing", "fixed_min_interval"):
            m = long[mode]
            print(
                f"  {mode:<21} {m['messages']:>5} messages {m['bytes'] / 1e3:>9.1f} kB "
                f"{m['redraws']:>4} redraws {m['points']:>5} points {m['seconds']:>6.2f} s"
            )
        print(f"  fixed/growing: {long['message_ratio']}x messages, {long['byte_ratio']}x bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
