"""A real Jupyter kernel: the interrupt button (SIGINT, as JupyterLab sends it) must stop a
widget's run, whether the kernel is idle while the run trains in the background or a cell is
running; and a re-run widget cell must stop the old widget's run."""

import os
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

SETUP = """
import os, tempfile, threading, time
import ipywidgets as W
import widgets.live as L
from lessons.config import TrainConfig
os.environ["LESSONS_RUNS"] = tempfile.mkdtemp()

def make():
    return L.LiveRun(
        {"lr": W.FloatSlider(value=0.05, min=0.001, max=1, continuous_update=False)},
        lambda v: TrainConfig.from_profile("ci", device="cpu", lr=v["lr"], epochs=500),
        name="kernel-test", renderer="matplotlib", replay=False,
    )

def trainers():
    return [t.name for t in threading.enumerate() if t.name.startswith("LiveRun-")]

def started(live):
    t0 = time.time()
    while not (live.last_run and len(live.last_run.records) > 2):
        assert time.time() - t0 < 120, "no run started"
        time.sleep(0.05)
    return "started"

live = make()
"""

REPORT = """
stopped = live.wait(30)
print("REPORT", stopped, live.last_run.status, len(trainers()), "Stopped" in live.status.value)
"""


@pytest.fixture
def kernel():
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(env={**os.environ, "LESSONS_PROFILE": "ci", "LESSONS_DEVICE": "cpu"})
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)

    def run(code, timeout=180):
        out = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("ERROR " + msg["content"]["ename"])

        reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"]["status"], "".join(out)

    status, out = run(SETUP)
    assert status == "ok", out
    yield km, kc, run
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def report(run) -> list[str]:
    status, out = run(REPORT)
    assert status == "ok", out
    return out.split("REPORT", 1)[1].split()


def test_interrupt_while_idle_stops_the_background_run(kernel):
    km, kc, run = kernel
    assert run("live.request(live.values()); started(live)")[0] == "ok"
    time.sleep(0.5)  # the kernel is idle; the run trains in its thread
    km.interrupt_kernel()
    assert report(run) == ["True", "stopped", "0", "True"]
    # and the widget still works afterwards
    status, out = run("live.request(live.values()); print(started(live)); live.stop()")
    assert status == "ok" and "started" in out, out


def test_interrupt_during_a_cell_stops_the_cell_and_the_run(kernel):
    km, kc, run = kernel
    assert run("live.request(live.values()); started(live)")[0] == "ok"
    # stop_on_error=False: ipykernel would otherwise abort the REPORT request if it arrives
    # while the interrupted cell's error is still being handled (seen under make test's load)
    msg_id = kc.execute("time.sleep(60)", stop_on_error=False)  # a cell busy with another thing
    time.sleep(1.0)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert report(run) == ["True", "stopped", "0", "True"]


def test_interrupting_run_blocking_leaves_no_thread(kernel):
    km, kc, run = kernel
    msg_id = kc.execute("live.run_blocking(timeout=300)", stop_on_error=False)  # as above
    time.sleep(3.0)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=60)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert report(run)[:3] == ["True", "stopped", "0"]


def test_rerunning_the_widget_cell_stops_the_old_run(kernel):
    km, kc, run = kernel
    assert run("live.request(live.values()); started(live); old = live")[0] == "ok"
    status, out = run("live = make(); print('OLD', old.wait(30), old.last_run.status)")
    assert status == "ok" and "OLD True stopped" in out, out
    assert run("print('N', len(trainers()))")[1].strip() == "N 0"
