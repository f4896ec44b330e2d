"""What a LiveRun's legend says: the settings every run shares once, in the title, and for
each run its name and the settings in which it differs; the newest requests' runs first, and
the older requests folded into one entry.

A run's label is "name: setting, setting, ..." (LiveRun.label_run: settings_label's
"key=value" parts, or a lesson's run_label), so its settings are its label's parts after the
name. RunRecord.label keeps the whole text for the status line, the hover text and the CSV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from widgets.runs import RunRecord

# the requests whose runs get legend entries of their own: the newest always, the ones before
# it while there are at most SHOWN_REQUESTS of them and SHOWN_ENTRIES entries in all
SHOWN_REQUESTS = 3
SHOWN_ENTRIES = 8
EARLIER = "earlier runs"  # the one entry of the folded requests' runs


def label_parts(run: RunRecord) -> list[str]:
    """The settings a run's label names, in order: its label after "name: ", split at the
    commas outside brackets ("betas=(0.9, 0.99)" stays one part)."""
    text = run.label
    if run.name and text.startswith(f"{run.name}: "):
        text = text[len(run.name) + 2 :]
    elif run.name and text == run.name:
        return []
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


@dataclass
class Legend:
    """The title's line of shared settings, each run's legend text (by run id) and which runs
    are folded into the EARLIER entry."""

    common: str = ""
    short: dict[int, str] = field(default_factory=dict)
    rank: dict[int, int] = field(default_factory=dict)  # 0: the newest request's runs
    folded: set[int] = field(default_factory=set)
    twins: set[int] = field(default_factory=set)  # runs drawn over an identical earlier one

    def title_line(self) -> str:
        """The shared settings, as a line under the figure's title ("" when none)."""
        if not self.common:
            return ""
        return f"all runs: {self.common}" if len(self.short) > 1 else self.common


def shared_settings(runs: Sequence[RunRecord]) -> list[str]:
    """The settings every one of ``runs`` names alike, in the first run's order."""
    if not runs:
        return []
    parts = [label_parts(r) for r in runs]
    return [p for p in parts[0] if all(p in other for other in parts[1:])]


def short_label(run: RunRecord, common: Sequence[str], newest: bool) -> str:
    """The run's name and the settings in which it differs from ``common``; its seeds, and
    where a saved run ran, as display_label says them."""
    differs = ", ".join(p for p in label_parts(run) if p not in common)
    if run.name:
        text = f"{run.name}: {differs}" if differs else run.name
    else:
        text = differs or ("newest run" if newest else "earlier run")
    if run.seed_runs:
        text += f" ({1 + len(run.seed_runs)} seeds)"
    if run.replayed:
        text += f" (saved, {run.meta.get('device', '?')})"
    return text


def identical_runs(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Groups of finished runs of one request whose records are equal, loss for loss: on a
    plot they draw one curve, and the other names vanish under it."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.status != "done" or run.lead is not None:
            continue
        key = (run.group, *((m.kind, m.step, m.loss, m.val_loss, m.val_acc) for m in run.records))
        groups.setdefault(key, []).append(run)
    return [g for g in groups.values() if len(g) > 1]


def plan(runs: Sequence[RunRecord]) -> Legend:
    """The legend of these runs (oldest first, as RunHistory keeps them): shared settings,
    short labels and each run's rank by its request's recency (0: the newest). A seed run has
    no entry of its own (widgets.seeds)."""
    leads = [r for r in runs if r.lead is None]
    common = shared_settings(leads)
    newest = max((r.group for r in leads if not r.replayed), default=None)
    # the requests newest first; RunHistory appends runs as they start
    groups = list(dict.fromkeys(r.group for r in reversed(leads)))
    rank = {g: i for i, g in enumerate(groups)}
    short = {r.id: short_label(r, common, r.group == newest and not r.replayed) for r in leads}
    twins = set()
    for same in identical_runs(leads):  # the later ones say whose curve they lie on
        for r in same[1:]:
            short[r.id] += f" (= {same[0].name or short[same[0].id]}, same curve)"
            twins.add(r.id)
    return Legend(
        common=", ".join(common),
        short=short,
        rank={r.id: rank[(r.lead or r).group] for r in runs},
        twins=twins,
    )


def fold(legend: Legend, runs: Sequence[RunRecord], entries: set[int]) -> None:
    """Fold the older requests' runs into one entry: the newest request keeps its entries
    (the runs in ``entries``, those drawn), the ones before it while there are at most
    SHOWN_REQUESTS of them and SHOWN_ENTRIES entries in all."""
    per_rank: dict[int, int] = {}
    for r in runs:
        per_rank[legend.rank[r.id]] = per_rank.get(legend.rank[r.id], 0) + (r.id in entries)
    shown, total = set(), 0
    for k in sorted(per_rank):
        if shown and (len(shown) >= SHOWN_REQUESTS or total + per_rank[k] > SHOWN_ENTRIES):
            break
        shown.add(k)
        total += per_rank[k]
    legend.folded = {r.id for r in runs if legend.rank[r.id] not in shown}
