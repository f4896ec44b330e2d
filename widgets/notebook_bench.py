"""``python -m widgets.notebook_bench [--profile P] [notebook ...]``: how long each notebook takes
top to bottom, as Run All in a fresh kernel, and whether its self-checks pass.

Each notebook runs in its own kernel (nbclient) with LESSONS_PROFILE set and an empty run log of
its own, so that nothing is replayed or reused from an earlier run. A failing cell ends the
notebook's run and is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def time_notebook(path: Path, profile: str, timeout: float = 1800, out: Path | None = None) -> dict:
    """Run one notebook top to bottom; its seconds, and the first failing cell if any. With
    ``out``, the executed notebook (its printed numbers) is written into that folder."""
    nb = nbformat.read(path, as_version=4)
    # the kernel inherits the profile and the run log; this process's environment is restored
    with (
        tempfile.TemporaryDirectory(prefix="runs-") as runs,
        mock.patch.dict(os.environ, LESSONS_PROFILE=profile, LESSONS_RUNS=runs),
    ):
        client = NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": path.parent}})
        t0 = time.perf_counter()
        failed = None
        try:
            client.execute()
        except CellExecutionError as e:
            failed = failure(e)
        seconds = time.perf_counter() - t0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
    return {"notebook": path.name, "seconds": round(seconds, 1), "failed": failed}


def plain_traceback(e: CellExecutionError) -> str:
    """The error's traceback without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(e))


def failing_line(e: CellExecutionError) -> str:
    """The line that raised, as IPython's traceback marks it ("---> 49 assert ..."; the arrow
    is padded to the line number's width); "" where none is marked."""
    marked = [ln.strip() for ln in plain_traceback(e).splitlines() if re.match(r"\s*-+> ", ln)]
    return marked[-1] if marked else ""


def failure(e: CellExecutionError) -> str:
    """The error and the line that raised it."""
    line = failing_line(e)
    return f"{e.ename}: {e.evalue}{f' at {line}' if line else ''}"[:400]


def machine() -> str:
    """The CPU and thread count the figures were taken on (for BENCHMARKS.md)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: all)")
    ap.add_argument("--profile", default="cpu", choices=["ci", "cpu", "gpu"])
    ap.add_argument("--json", action="store_true", help="one JSON object, not a table")
    ap.add_argument("--out", type=Path, help="write the executed notebooks into this folder")
    args = ap.parse_args()
    names = args.notebooks or sorted(p.name for p in NOTEBOOKS.glob("[0-9]*.ipynb"))
    rows = []
    for name in names:
        rows.append(time_notebook(NOTEBOOKS / name, args.profile, out=args.out))
        if not args.json:
            r = rows[-1]
            print(f"{r['notebook']:42} {r['seconds']:7.1f} s  {r['failed'] or 'checks passed'}")
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"profile": args.profile, "machine": machine(), "notebooks": rows}))
    else:
        print(f"profile {args.profile}; {machine()}")


if __name__ == "__main__":
    main()
