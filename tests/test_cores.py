"""The busy-cores count leaves out the browser and Jupyter, which the student cannot close."""

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from widgets import status as status_mod
from widgets.cores import CoreShare, is_front_end


def test_browsers_and_jupyter_are_front_end_other_kernels_are_not():
    assert is_front_end("chrome", ["/opt/google/chrome/chrome", "--type=renderer"])
    assert is_front_end("firefox-bin", None)  # a command line we may not read
    assert is_front_end("python3", ["/usr/bin/python3", "/home/u/.venv/bin/jupyter-lab"])
    # another notebook's kernel trains too, and the student can close it
    kernel = ["/home/u/jupyter-env/bin/python", "-m", "ipykernel_launcher", "-f", "k.json"]
    assert not is_front_end("python", kernel)
    assert not is_front_end("stress", ["stress", "--cpu", "2"])
    assert not is_front_end(None, None)


def _proc(pid, name, cmdline, cpu):
    times = SimpleNamespace(user=cpu, system=0.0)
    return SimpleNamespace(pid=pid, info={"name": name, "cmdline": cmdline, "cpu_times": times})


def test_the_browsers_cpu_time_is_not_counted_as_other_programs(monkeypatch):
    start = [
        _proc(10, "chrome", ["chrome"], 5.0),
        _proc(11, "python", ["python", "-m", "ipykernel_launcher"], 1.0),
    ]
    later = [
        _proc(10, "chrome", ["chrome"], 7.0),  # 2 s more
        _proc(12, "chrome", ["chrome", "--type=renderer"], 0.5),  # new since the start
        _proc(11, "python", ["python", "-m", "ipykernel_launcher"], 3.0),  # counted
    ]
    procs = [start]
    monkeypatch.setattr(psutil, "process_iter", lambda attrs: iter(procs[0]))
    share = CoreShare()
    procs[0] = later
    assert share._front() == pytest.approx(2.5)
    # 6 s of busy cores over 2 s of wall time: 1 s ours, 2.5 s the browser's
    own0 = share._start[2]  # the browser's part of it counts from the start: zero
    share._start = (time.perf_counter() - 2.0, 10.0, own0)
    share._busy = lambda: 16.0
    share._own = lambda: own0 + 1.0
    assert share.others(min_wall=0) == pytest.approx((6.0 - 1.0 - 2.5) / 2.0, rel=0.01)


def test_a_busy_browser_on_the_machine_is_left_out(tmp_path, monkeypatch):
    script = tmp_path / "fake_chromium.py"
    script.write_text("while True: sum(i * i for i in range(999))\n")
    browser = subprocess.Popen([sys.executable, str(script)])
    try:
        time.sleep(0.3)  # the interpreter has started
        hog = psutil.Process(browser.pid)
        # only this process: a real browser elsewhere on the machine (the browser tests
        # beside this one) must not count in what is compared
        real_iter = psutil.process_iter
        monkeypatch.setattr(
            psutil,
            "process_iter",
            lambda attrs: (p for p in real_iter(attrs) if p.pid == browser.pid),
        )
        before = sum(hog.cpu_times()[:2])
        share = CoreShare()
        time.sleep(1.5)
        counted = share._front()
        used = sum(hog.cpu_times()[:2]) - before
        # all that the "browser" used is counted as the front end's (others may hold the
        # machine's cores too, so how much it got is not fixed)
        assert used > 0.1 and used - 0.1 <= counted <= used + 0.02
    finally:
        browser.kill()
        browser.wait()


def test_the_note_says_the_browser_is_not_counted():
    note = status_mod.core_share_note(1.0, cores=2, threads=2)
    assert "not counting your browser and Jupyter" in note
