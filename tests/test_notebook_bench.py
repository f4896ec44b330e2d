"""The notebook timer runs a notebook in a fresh kernel under the profile asked for, with an
empty run log of its own, and reports the first failing cell instead of stopping."""

import json
import os

import nbformat

from widgets.notebook_bench import time_notebook


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)
    return path


def test_a_passing_notebook_runs_under_the_profile_with_a_fresh_run_log(tmp_path):
    out = tmp_path / "seen.json"
    code = (
        "import os, json, pathlib\n"
        f"pathlib.Path({str(out)!r}).write_text(json.dumps([os.environ['LESSONS_PROFILE'],"
        " os.listdir(os.environ['LESSONS_RUNS'])]))"
    )
    runs_before = os.environ.get("LESSONS_RUNS")
    row = time_notebook(
        _notebook(tmp_path / "ok.ipynb", code + "\nprint('done')"), "ci", out=tmp_path / "out"
    )
    assert row["failed"] is None and row["seconds"] > 0
    executed = nbformat.read(tmp_path / "out" / "ok.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "done\n"  # what the reader would see
    assert json.loads(out.read_text()) == ["ci", []]
    assert os.environ.get("LESSONS_RUNS") == runs_before  # this process's setting is back


def test_a_failing_self_check_is_reported_with_its_error(tmp_path):
    nb = _notebook(tmp_path / "bad.ipynb", "x = 1", "assert x == 2, 'the claim'", "y = 3")
    row = time_notebook(nb, "ci")
    assert row["notebook"] == "bad.ipynb"
    assert row["failed"].startswith("AssertionError") and "the claim" in row["failed"]
    assert "assert x == 2" in row["failed"]  # the line that raised
