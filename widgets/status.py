"""Every message a LiveRun's status line shows, worded once."""

from __future__ import annotations

import html
import math

from tqdm.auto import tqdm

from lessons import data as data_mod
from widgets.runs import RunRecord

READY = "Ready: move a slider or press Run."
FRONT_END_NOTICE = (
    "The plotly figure did not display in this front end, so plots are drawn with "
    "matplotlib (set LESSONS_PLOT=matplotlib to start that way)."
)
COLORS = {"info": "#333", "ok": "#1a7f37", "warn": "#9a6700", "error": "#cf222e"}


def status_html(text: str, level: str = "info") -> str:
    """``text`` in the colour of ``level``: info, ok, warn or error."""
    return f'<span style="color:{COLORS[level]}">{html.escape(text)}</span>'


def free_gpu_memory() -> None:
    """Give the cached allocator's blocks back after an out-of-memory error, so that the
    next, smaller run (or another notebook) can have them."""
    import gc

    import torch

    gc.collect()  # the failed run's tensors: frames of the traceback may still hold them
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def describe_error(e: BaseException) -> str:
    """A message that says what happened and what to do (after out of memory, the GPU's
    cached memory is freed)."""
    import torch

    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        free_gpu_memory()
        return (
            "The GPU ran out of memory: lower the batch size (or restart the kernel to "
            "free memory held by other notebooks) and run again."
        )
    if isinstance(e, data_mod.DataError):
        return f"The data set is not available: {e}"
    if isinstance(e, ValueError):
        return f"Impossible setting: {e}"
    return f"The run failed ({type(e).__name__}: {e}). Change a setting and run again."


# --------------------------------------------------------------------------- the data set
def data_notice(ds) -> str:
    """The data set's notice (generated data in place of Imagenette), for the status line."""
    return f" NOTICE: {ds.notice}" if ds.notice else ""


def data_subtitle(ds) -> str:
    """The data set, for the figure's subtitle."""
    return ds.name + (" - GENERATED DATA, Imagenette unavailable" if ds.notice else "")


def preparing(dataset: str, device) -> str:
    return f"Preparing {dataset} data on {device}..."


# --------------------------------------------------------------------------- a request
def running(
    what: str, ds, precision: str, detail: str = "", front_end_notice: str = ""
) -> tuple[str, str]:
    """(text, level) while ``what`` trains on ``ds``."""
    notice = data_notice(ds) + (f" {front_end_notice}" if front_end_notice else "")
    detail = f": {detail}" if detail else ""
    text = f"Running {what} on {ds.device}, {precision} ({ds.name}){detail}.{notice}"
    return text, "warn" if notice else "info"


def progress(step: int, total: int, elapsed: float) -> str:
    """ "12/62 steps [00:01<00:04, 11.2step/s]"."""
    return tqdm.format_meter(
        step,
        total,
        elapsed,
        unit="step",
        bar_format="{n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}]",
    )


def done(what: str, secs: float, result: str, notice: str | None, cores: str) -> tuple[str, str]:
    """ "Done <what> in <secs> s: <result>.", then the data notice and the cores note; a
    warning colour if either is there."""
    text = (
        f"Done {what} in {secs:.1f} s"
        + (f": {result}" if result else "")
        + "."
        + (f" NOTICE: {notice}" if notice else "")
        + cores
    )
    return text, "warn" if notice or cores else "ok"


def reused(n: int, total: int) -> str:
    """Says that ``n`` of the request's ``total`` runs were shown, not retrained."""
    which = "every run" if n == total else f"{n} of {total} runs"
    return f"({which} unchanged by this setting: shown again, not retrained.)"


def stayed_at_chance(runs: list[RunRecord], classes: int) -> tuple[str, str] | None:
    """A finished run that never learned: its last validation loss still at chance's
    ln(classes) and its accuracy at chance's 1/classes. Says so, with what to change."""
    chance = math.log(classes)
    stuck = []
    for run in runs:
        ev = run.last("eval")
        if ev is not None and ev.val_loss > 0.98 * chance and ev.val_acc < 1.3 / classes:
            stuck.append(f"{run.label} (val loss {ev.val_loss:.3f})")
    if not stuck:
        return None
    text = (
        f"{'; '.join(stuck)}: stayed at chance (loss {chance:.3f}): lower the learning rate, "
        "or train longer at a large batch."
    )
    return text, "warn"


def diverged(runs: list[RunRecord]) -> tuple[str, str]:
    texts = []
    for run in runs:
        last = run.records[-1]
        reason = last.extras.get("reason", "loss not finite")
        texts.append(f"Diverged at step {last.step} ({reason}) with {run.label}")
    return "; ".join(texts) + ": lower the learning rate and run again.", "error"


def stopped(runs: list[RunRecord], what: str, total: int) -> tuple[str, str]:
    """One stopped run by its label and step, several by their count and the request."""
    if len(runs) > 1:
        return f"Stopped {len(runs)} runs of {what}.", "warn"
    run = runs[0]
    step = run.records[-1].step if run.records else 0
    return f"Stopped {run.label} at step {step} of {total}.", "warn"


def core_share_note(others: float | None, cores: int, threads: int) -> str:
    """What to say when other programs held cores that the run's torch threads needed: a
    team of two or more threads, more threads than the cores others left free, and most of a
    core taken. Below that it stays quiet: one thread instead of two would gain little
    (BENCHMARKS.md). ``others`` leaves out the browser and Jupyter (widgets.cores): the note
    names only what the student could close."""
    if others is None or threads < 2 or others < 0.75 or threads + others <= cores + 0.25:
        return ""
    free = max(1, int(cores - others + 0.25))
    return (
        f" Other programs (not counting your browser and Jupyter) kept {others:.1f} of the "
        f"{cores} CPU cores busy during this run, "
        f"and torch's {threads} threads wait for each other when one loses its core: that "
        f"can make training several times slower. Close them, or start Jupyter with "
        f"OMP_NUM_THREADS={free} (e.g. OMP_NUM_THREADS={free} make lab)."
    )


# --------------------------------------------------------------------------- export
def exported(paths: dict) -> tuple[str, str]:
    folder = next(iter(paths.values())).parent
    return f"Exported {', '.join(p.name for p in paths.values())} to {folder}", "ok"


def export_failed(e: Exception) -> tuple[str, str]:
    return f"Export failed ({type(e).__name__}: {e}).", "error"


def log_failed(status: str, e: OSError) -> str:
    return f"{status} (could not save the run log: {e})"
