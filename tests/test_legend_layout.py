"""What a legend shows where runs coincide or fill several rows: a run identical to an earlier
one of its request is drawn so that both show, and matplotlib's legend reads row by row."""

import pytest

from lessons.config import Metrics
from widgets.figure import Trace
from widgets.legend import identical_runs, plan
from widgets.mpl_figure import MatplotlibFigure
from widgets.runs import RunRecord
from widgets.scene import DEFAULT_SERIES, run_traces


def finished(run_id: int, name: str, losses: list[float], group: int = 1) -> RunRecord:
    records = [
        Metrics(i + 1, 32 * (i + 1), (i + 1) / len(losses), y, 0.01, 32)
        for i, y in enumerate(losses)
    ]
    records.append(Metrics(len(losses), 32 * len(losses), 1.0, None, 0.01, 32, 2.0, 0.3, "eval"))
    return RunRecord(run_id, {}, f"{name}: lr=0.01", records, status="done", group=group, name=name)


def test_a_run_identical_to_an_earlier_one_is_named_and_drawn_dash_dotted():
    course = finished(1, "LAMB course", [2.3, 2.1, 1.9])
    no_cap = finished(2, "LAMB no cap", [2.3, 2.1, 1.9])  # the cap never bound: the same run
    adamw = finished(3, "AdamW", [2.3, 2.0, 1.8])
    runs = [course, no_cap, adamw]
    assert [[r.name for r in g] for g in identical_runs(runs)] == [["LAMB course", "LAMB no cap"]]
    legend = plan(runs)
    assert legend.twins == {2}
    assert legend.short[2] == "LAMB no cap (= LAMB course, same curve)"
    assert "same curve" not in legend.short[1] + legend.short[3]
    main = {t.uid: t for t in run_traces(runs, DEFAULT_SERIES, {})}
    assert main["2:loss"].dash == "dashdot"  # over the first, which stays solid
    assert main["1:loss"].dash == main["3:loss"].dash == "solid"
    assert main["2:val_loss"].dash == "dash"  # the other curves keep their own styles


def test_equal_curves_of_different_requests_or_unfinished_runs_are_not_twins():
    earlier = finished(1, "LAMB", [2.3, 2.1, 1.9], group=1)
    later = finished(2, "LAMB", [2.3, 2.1, 1.9], group=2)
    running = finished(3, "AdamW", [2.3, 2.1, 1.9], group=2)
    running.status = "running"
    assert identical_runs([earlier, later, running]) == []
    assert plan([earlier, later, running]).twins == set()


def _rows(fig: MatplotlibFigure) -> list[list[str]]:
    """The legend's texts as they sit on the figure, top row first, left to right."""
    fig.fig.canvas.draw()
    renderer = fig.fig.canvas.get_renderer()
    texts = [(t.get_window_extent(renderer), t.get_text()) for t in fig.fig.legends[0].texts]
    rows: dict[float, list] = {}
    for box, text in texts:
        rows.setdefault(round(box.y0), []).append((box.x0, text))
    return [[t for _, t in sorted(row)] for _, row in sorted(rows.items(), reverse=True)]


@pytest.mark.parametrize("n", [5, 7, 9])
def test_a_matplotlib_legend_of_several_rows_reads_row_by_row(n):
    fig = MatplotlibFigure(xlabel="step", ylabel="loss")
    names = [f"run number {i} with a long name" for i in range(n)]
    fig.draw([Trace(str(i), [0, 1], [1, 2], name=name, rank=i) for i, name in enumerate(names)])
    rows = _rows(fig)
    assert len(rows) > 1  # the case in question: more entries than fit one row
    assert [t for row in rows for t in row] == names  # newest first, left to right
