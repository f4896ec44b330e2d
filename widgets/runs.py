"""Run records: what one run trained with and recorded, its label, the JSON-lines run
log that keeps runs across kernel restarts (and carries GPU runs to a CPU classroom), and the
CSV export."""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lessons import data as data_mod
from lessons.config import Metrics
from widgets.figure import COLORS


@dataclass
class RunRecord:
    """A run's settings and records; what the figure draws and the run log stores."""

    id: int
    settings: dict
    label: str
    records: list[Metrics] = field(default_factory=list)
    status: str = "running"  # running | done | stopped | diverged | error
    replayed: bool = False
    meta: dict = field(default_factory=dict)
    group: int = 0  # runs started by one request (one setting) share a group
    name: str = ""  # the run's name inside its group ("LAMB", "AdamW"...), "" when alone
    role_color: str = ""  # its role's colour (RunHistory), where the lesson names roles
    # the same settings with other seeds (widgets.seeds), and for one of those its lead
    seed_runs: list[RunRecord] = field(default_factory=list, repr=False, compare=False)
    lead: RunRecord | None = field(default=None, repr=False, compare=False)

    @property
    def display_label(self) -> str:
        """The whole label: settings, and for a run from the log where it ran (the hover
        text and the CSV; the legend says what differs, widgets.legend)."""
        if not self.replayed:
            return self.label
        return f"{self.label} (saved, {self.meta.get('device', '?')})"

    def series(self, x: str = "samples") -> dict[str, tuple[list, list]]:
        """Train loss, val loss and val accuracy against ``x``: "samples" or "step"."""
        train = [r for r in self.records if r.kind == "train"]
        evals = [r for r in self.records if r.kind == "eval"]
        return {
            "loss": ([getattr(r, x) for r in train], [r.loss for r in train]),
            "val_loss": ([getattr(r, x) for r in evals], [r.val_loss for r in evals]),
            "val_acc": ([getattr(r, x) for r in evals], [r.val_acc for r in evals]),
        }

    @property
    def color(self) -> str:
        """The run's colour, the same in every figure and panel: its role's, else its own."""
        return self.role_color or COLORS[self.id % len(COLORS)]

    def result(self) -> str:
        """The last validation numbers, as the status line says them ("" before any)."""
        ev = self.last("eval")
        return f"val accuracy {ev.val_acc:.1%}, val loss {ev.val_loss:.3f}" if ev else ""

    def last(self, kind: str) -> Metrics | None:
        return next((r for r in reversed(self.records) if r.kind == kind), None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "settings": self.settings,
                "label": self.label,
                "status": self.status,
                "meta": self.meta,
                "records": [r.to_dict() for r in self.records],
            }
        )

    @classmethod
    def from_json(cls, line: str, run_id: int) -> RunRecord:
        d = json.loads(line)
        return cls(
            run_id,
            d["settings"],
            d["label"],
            [Metrics.from_dict(r) for r in d["records"]],
            d["status"],
            True,
            d.get("meta", {}),
            group=run_id,  # each saved run stands alone
            name=d.get("name", ""),
        )


class RunHistory:
    """The runs a LiveRun shows: the newest request's and those of the ``max_history``
    requests before it, one curve per label, and the runs of the last request. Thread-safe:
    the worker adds runs while the figure reads them."""

    def __init__(
        self,
        runs: list[RunRecord],
        max_history: int,
        role_of: Callable[[str], str] | None = None,
    ):
        """``role_of``: a run's name -> its role ("baseline", "grow batch", "B=64"); every run
        of a role gets the role's colour, in every panel, request and export."""
        self.max_history = max_history
        self.role_of = role_of
        self._palette: dict[str, str] = {}  # role -> colour, in the order roles appear
        for run in runs:
            self._paint(run)
        self.runs = runs
        self.last_run: RunRecord | None = None  # the run the last request made (None: none)
        self.last_group: dict[str, RunRecord] = {}  # the runs of the last request, by name
        self._lock = threading.Lock()
        self._next_id = 0
        self._group = 0

    def new_request(self) -> int:
        """Start a new group of runs; its number."""
        with self._lock:
            self.last_run, self.last_group = None, {}
            self._group += 1
            return self._group

    def add(
        self, name: str, label: str, values: dict, meta: dict, lead: RunRecord | None = None
    ) -> RunRecord:
        """A new run of the current request; with ``lead``, one of that run's seed runs (drawn
        beside it, not one of ``last_group``)."""
        with self._lock:
            self._next_id += 1
            run = RunRecord(
                self._next_id, dict(values), label, meta=meta, group=self._group, name=name
            )
            self._paint(run, lead)
            # one curve per setting: a rerun replaces the older curve of the same settings
            # (and its seed runs)
            gone = {id(r) for r in self.runs if r.label == run.label and r.status != "running"}
            self.runs = [r for r in self.runs if not {id(r), id(r.lead)} & gone]
            self.runs.append(run)
            if lead is not None:
                run.meta["seed_of"] = lead.label
                attach(run, lead)
            else:
                self.last_run = run
                self.last_group[name] = run
            groups = list(dict.fromkeys(r.group for r in self.runs))
            keep = set(groups[-(self.max_history + 1) :])
            self.runs = [r for r in self.runs if r.group in keep]
        return run

    def finished(self) -> dict[str, RunRecord]:
        """This session's finished runs by what they trained (their meta "key"), to be shown
        again rather than retrained."""
        with self._lock:
            return {
                r.meta["key"]: r
                for r in self.runs
                if r.status == "done" and not r.replayed and r.meta.get("key")
            }

    def _paint(self, run: RunRecord, lead: RunRecord | None = None) -> None:
        """Give a named run its role's colour, the next free one for a new role; a seed run
        its lead's colour."""
        if lead is not None or run.lead is not None:
            lead = lead or run.lead
            run.role_color = lead.role_color or lead.color
            return
        if self.role_of is None or not run.name:
            return
        role = self.role_of(run.name)
        if role not in self._palette:
            self._palette[role] = COLORS[len(self._palette) % len(COLORS)]
        run.role_color = self._palette[role]

    def drop(self, run: RunRecord) -> None:
        """Forget a run that has nothing worth showing."""
        with self._lock:
            self.runs = [r for r in self.runs if r is not run and r.lead is not run]
            if self.last_group.get(run.name) is run:
                self.last_group.pop(run.name)
            if run.lead is not None:
                run.lead.seed_runs = [r for r in run.lead.seed_runs if r is not run]

    def clear(self) -> None:
        """Forget the earlier requests' runs and the replayed ones: the newest request's runs
        stay (the summary and the lesson read them), as do runs still training."""
        with self._lock:
            newest = max((r.group for r in self.runs if not r.replayed), default=None)
            self.runs = [
                r
                for r in self.runs
                if r.status == "running" or (r.group == newest and not r.replayed)
            ]


def attach(run: RunRecord, lead: RunRecord) -> None:
    """Make ``run`` one of ``lead``'s seed runs: its group and, in the figure, its colour."""
    run.lead, run.group = lead, lead.group
    run.role_color = lead.role_color or lead.color
    lead.seed_runs.append(run)


# --------------------------------------------------------------------------- labels
def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return str(x)


def settings_label(values: dict) -> str:
    """Settings for a legend entry: key=value each, a ticked box by its name alone and an
    unticked one left out."""
    parts = [k if isinstance(x, bool) else f"{k}={_fmt(x)}" for k, x in values.items()]
    return ", ".join(p for p, x in zip(parts, values.values()) if x is not False) or "defaults"


# --------------------------------------------------------------------------- run log
def run_log_path(name: str) -> Path:
    """LESSONS_RUNS/<name>.jsonl, by default in the data folder's runs/."""
    folder = os.environ.get("LESSONS_RUNS")
    return (Path(folder) if folder else data_mod.data_dir() / "runs") / f"{name}.jsonl"


def append_run(path: Path, run: RunRecord) -> None:
    """Append one line and fsync; a torn last line is skipped on load, never misread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(run.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_runs(path: Path, limit: int) -> list[RunRecord]:
    """The last ``limit`` runs of the log, with negative ids (they stand apart from new runs)."""
    runs = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return runs
    for i, line in enumerate(lines):
        try:
            runs.append(RunRecord.from_json(line, -1 - i))
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line: skip it
    runs = runs[-limit:] if limit else []
    return _seed_runs_to_leads(runs)


def _seed_runs_to_leads(runs: list[RunRecord]) -> list[RunRecord]:
    """Attach each saved seed run to the latest earlier run it was a seed of; drop it when
    that lead is not among ``runs``."""
    kept: list[RunRecord] = []
    for run in runs:
        of = run.meta.get("seed_of")
        if of is None:
            kept.append(run)
            continue
        lead = next((r for r in reversed(kept) if r.label == of and r.lead is None), None)
        if lead is not None:
            attach(run, lead)
            kept.append(run)
    return kept


# --------------------------------------------------------------------------- CSV
CSV_FIELDS = ("run", "label", "status", "device", "kind", "step", "samples", "epoch")


def write_runs_csv(f, runs: Sequence[RunRecord]) -> None:
    """One row per record of every run: its settings, where it ran, and every number."""
    settings = list(dict.fromkeys(k for r in runs for k in r.settings))
    numbers = list(
        dict.fromkeys(
            k
            for r in runs
            for rec in r.records
            for k, v in {**rec.to_dict(), **rec.extras}.items()
            if k not in CSV_FIELDS and k != "extras" and isinstance(v, (int, float))
        )
    )
    writer = csv.writer(f)
    writer.writerow([*CSV_FIELDS, *(f"setting_{k}" for k in settings), *numbers])
    for run in runs:
        for rec in run.records:
            d = {**rec.to_dict(), **rec.extras}
            writer.writerow(
                [
                    run.id,
                    run.display_label,
                    run.status,
                    run.meta.get("device", ""),
                    rec.kind,
                    rec.step,
                    rec.samples,
                    rec.epoch,
                    *(run.settings.get(k, "") for k in settings),
                    *(_csv_number(d.get(k)) for k in numbers),
                ]
            )


def _csv_number(v) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return ""
    return repr(v)
