"""One request of a LiveRun: from the controls' values to the runs' records and the status
line that says how it ended.

make_config turns the values into one TrainConfig or several ({name: config}). Every request,
one config or several, trains through lessons.sweep.train_many: side by side where
concurrent_by_default says so, else one after the other, where a stopped or failed run ends
the request. One loop appends each record to its run and moves the progress line and the
figure on; each run is finished in one place (its status, the run log), and the request's
outcome is worded in one place.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import TYPE_CHECKING

from lessons.config import TrainConfig
from lessons.profiles import pick_device
from lessons.sweep import concurrent_by_default, train_many
from lessons.train import load_data
from widgets import status
from widgets.cores import CoreShare
from widgets.runs import RunRecord, append_run
from widgets.seeds import expand

if TYPE_CHECKING:
    from widgets.live import LiveRun

ENDS = ("done", "diverged", "stopped")  # the kinds of a run's last record
# a run that a newer request stopped before this share of its steps is a stub: dropped, so that
# a burst of slider moves does not push the lesson's runs out of the history
STUB_SHARE = 0.1


class Request:
    """Train what one request of ``live`` asks for; ``stop`` ends it within a step."""

    def __init__(self, live: LiveRun, values: dict, stop: threading.Event):
        self.live = live
        self.values = values
        self.stop = stop
        self.configs: dict[str, TrainConfig] = {}
        self.lead_of: dict[str, str] = {}  # a seed run's name -> its lead's (widgets.seeds)
        self.data: dict = {}
        self.keys: dict[str, str] = {}  # what each config trains, on its device (_key)
        self.reused: dict[str, RunRecord] = {}  # finished runs of the same settings
        self.runs: dict[str, RunRecord] = {}  # the runs started so far, in order
        self.steps: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.active: list[str] = []  # the runs the progress line counts
        self.error: Exception | None = None
        self.log_error: OSError | None = None
        self.core_share: CoreShare | None = None

    def execute(self) -> bool:
        """Prepare, train and say how it went; False when nothing could start."""
        try:
            self._prepare()
        except Exception as e:
            self.live.say(status.describe_error(e), "error")
            return False
        on = next(iter(self.data.values())).device  # the device the data loaded on
        if on.type == "cpu":
            try:
                self.core_share = CoreShare()
            except Exception:  # advice only (psutil absent, counters unreadable)
                pass
        self.t0 = time.perf_counter()
        self._reuse()
        if self.configs:
            self._train(together=len(self.configs) > 1 and concurrent_by_default(on))
        else:
            self.live.draw()
        self._say_outcome()
        return True

    def _prepare(self) -> None:
        made = self.live.make_config(self.values)
        made = made if isinstance(made, dict) else {"": made}
        self.configs, self.lead_of = expand(made, self.live.seeds)
        first = next(iter(self.configs.values()))
        device = pick_device() if first.device is None else first.device
        self.live.say(status.preparing(first.dataset, device), "info")
        self.data = {name: load_data(c, device) for name, c in self.configs.items()}
        for name, c in self.configs.items():
            c.check(self.data[name].n_train)
        self.keys = {name: _key(c, self.data[name]) for name, c in self.configs.items()}
        finished = self.live.history.finished()
        for name in self.configs:
            old = finished.get(self.keys[name])
            lead = self.lead_of.get(name)
            if old is not None and (lead is None or lead in self.reused):
                self.reused[name] = old

    def _reuse(self) -> None:
        """Show the finished runs of unchanged settings again instead of retraining them (a
        control that does not affect them moved); train only the rest."""
        for name, old in self.reused.items():
            run = self._add(name, dict(old.meta, reused=True))
            run.records, run.status = list(old.records), "done"
        self.configs = {n: c for n, c in self.configs.items() if n not in self.reused}

    def _train(self, together: bool) -> None:
        """The one loop: records into runs, progress and redraws, runs finished as they end."""
        names = list(self.configs)
        self._start(names if together else names[:1], together)
        t0, last_draw = time.perf_counter(), 0.0
        try:
            for name, rec in train_many(self.configs, self.stop, self.data, concurrent=together):
                run = self.runs[name]
                run.records.append(rec)
                if "precision" in rec.extras and "precision" not in run.meta:
                    self._resolved(run, rec.extras["precision"], together)
                self.totals[name] = rec.extras.get("total_steps", self.totals[name])
                self.steps[name] = rec.step
                if rec.kind not in ENDS:
                    last_draw = self.live.redraw_due(last_draw, *self._counts(), t0)
                    continue
                self.live.show_progress(*self._counts(), time.perf_counter() - t0)
                self._finish(run)  # drawn at the next redraw, or the last
                following = [n for n in names if n not in self.runs]
                if not together and following and not self.stop.is_set():
                    self._start(following[:1], together)  # train_many trains it next
                    t0, last_draw = time.perf_counter(), 0.0
        except Exception as e:
            self.error = e
        for run in self.runs.values():
            if run.status == "running":
                self._finish(run)
        self.live.show_progress(*self._counts(), time.perf_counter() - t0)
        self.live.draw()

    def _start(self, names: list[str], together: bool) -> None:
        """New runs on the figure at once, and the status line says what trains."""
        for name in names:
            config, ds = self.configs[name], self.data[name]
            self.live.subtitle = status.data_subtitle(ds)
            meta = {  # and "precision", as the run resolved it (its first record)
                "profile": config.profile,
                "device": str(ds.device),
                "dataset": ds.name,
                "notice": ds.notice,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "key": self.keys[name],
            }
            self._add(name, meta)
            self.steps[name], self.totals[name] = 0, 1
        self.active = names

    def _add(self, name: str, meta: dict) -> RunRecord:
        """A new run on the figure, labelled; a seed run under its lead."""
        config = self.configs[name]
        lead = self.runs.get(self.lead_of.get(name, ""))
        if lead is not None:
            label = f"{lead.label}, seed {config.seed}"
        else:
            label = self.live.label_run(name, config, self.values)
        self.runs[name] = self.live.history.add(name, label, self.values, meta, lead)
        return self.runs[name]

    def _resolved(self, run: RunRecord, precision: str, together: bool) -> None:
        """A run's first record says how it computes: keep it, and say what trains now."""
        run.meta["precision"] = precision
        if run.name != self.active[0]:
            return
        n = len(self.configs)
        if together:
            what, detail = f"{n} runs side by side", self.live.label(self.values)
        else:
            what, detail = run.label + (f" ({len(self.runs)} of {n})" if n > 1 else ""), ""
        ds = self.data[run.name]
        self.live.say(*status.running(what, ds, precision, detail, self.live.front_end_notice))

    def _counts(self) -> tuple[int, int]:
        """Steps done and in all of the runs training now."""
        return sum(self.steps[n] for n in self.active), sum(self.totals[n] for n in self.active)

    def _finish(self, run: RunRecord) -> None:
        """Set how the run ended (a failed request: "error") and append it to the run log."""
        if self.error is not None:
            run.status = "error"
            return
        kind = run.records[-1].kind if run.records else "stopped"
        run.status = {"done": "done", "diverged": "diverged"}.get(kind, "stopped")
        if run.status == "stopped" and self._stub(run):
            self.live.history.drop(run)
            return
        if run.meta.get("reused"):
            return  # the run log has it already
        if run.status in ("done", "diverged") or run.status == "stopped" and run.records:
            try:
                append_run(self.live.log_path, run)
            except OSError as e:
                self.log_error = e

    def _stub(self, run: RunRecord) -> bool:
        """No point yet, or superseded by a newer request within its first STUB_SHARE of
        steps."""
        steps = sum(r.kind == "train" for r in run.records)
        early = steps < STUB_SHARE * self.totals.get(run.name, 1)
        return steps == 0 or (early and self.live.worker.superseded)

    def _say_outcome(self) -> None:
        """The one place that says how a request ended."""
        runs = list(self.runs.values())
        said = self._outcome(runs)
        if said is None:
            return
        text, level = said
        if self.log_error is not None:
            text = status.log_failed(text, self.log_error)
        self.live.say(text, level)

    def _outcome(self, runs: list[RunRecord]) -> tuple[str, str] | None:
        if self.error is not None:
            return status.describe_error(self.error), "error"
        diverged = [r for r in runs if r.status == "diverged"]
        if diverged:
            return status.diverged(diverged)
        stopped = [r for r in runs if r.status == "stopped"]
        if stopped:  # a newer request waits: it will say what it does
            total = self.totals[stopped[0].name]
            what = self.live.label(self.values)
            return None if self.live.worker.superseded else status.stopped(stopped, what, total)
        leads = [r for r in runs if r.lead is None]  # a seed run's numbers are in the summary
        parts = [f"{r.name}: {r.result()}" if r.name else r.result() for r in leads]
        what = runs[0].label if len(runs) == 1 else self.live.label(self.values)
        secs = time.perf_counter() - self.t0
        notice = runs[0].meta.get("notice")
        text, level = status.done(what, secs, "; ".join(parts), notice, self._cores())
        if self.reused:
            text += " " + status.reused(len(self.reused), len(runs))
        stuck = status.stayed_at_chance(leads, len(self.data[runs[0].name].classes))
        return (f"{text} {stuck[0]}", stuck[1]) if stuck else (text, level)

    def _cores(self) -> str:
        """status.core_share_note for this request so far (CPU runs only)."""
        if self.core_share is None:
            return ""
        import torch

        try:
            others = self.core_share.others()
        except Exception:  # the counters are advice: never let them fail a finished run
            return ""
        return status.core_share_note(others, self.core_share.cores, torch.get_num_threads())


def _key(config: TrainConfig, ds) -> str:
    """What ``config`` trains, on which data and device: a finished run with the same key is
    the same run (TrainConfig.fingerprint); "" for a config that cannot be compared."""
    fingerprint = config.fingerprint()
    if fingerprint is None:
        return ""
    text = f"{fingerprint};data={ds.name};device={ds.device}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
