"""The course as a product: pins, notebooks stored clean, the shared setup cell, README, CI."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def pins_from_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    return dict(r.split("==") for r in reqs)


def test_every_dependency_is_pinned_and_conda_agrees():
    pins = pins_from_pyproject()
    assert pins and all(re.fullmatch(r"\d+(\.\d+)*", v) for v in pins.values())
    text = (ROOT / "environment.yml").read_text()
    conda = dict(re.findall(r"^\s+- ([A-Za-z0-9_.-]+)==(\S+)\s*$", text, re.M))
    assert conda == pins


def test_there_is_a_notebook_and_each_is_clean_with_a_kernelspec():
    assert any(nb.name == "00_start_here.ipynb" for nb in NOTEBOOKS)
    for nb in NOTEBOOKS:
        d = json.loads(nb.read_text())
        assert d["metadata"]["kernelspec"]["name"] == "python3", nb.name
        for cell in d["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, nb.name


def setup_source(nb: Path) -> str:
    cell = json.loads(nb.read_text())["cells"][0]
    assert cell["cell_type"] == "code"
    return "".join(cell["source"])


def test_every_notebook_opens_with_the_same_setup_cell():
    sources = {setup_source(nb) for nb in NOTEBOOKS}
    assert len(sources) == 1
    assert "google.colab" in sources.pop()


def test_setup_cell_on_colab_installs_without_torch_and_enables_widgets(monkeypatch):
    calls, enabled = [], []
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: enabled.append(1))
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    exec(setup_source(NOTEBOOKS[0]), {})
    assert enabled == [1]
    assert calls and all(c[:4] == [sys.executable, "-m", "pip", "install"] for c in calls)
    package = next(c for c in calls if any(a.startswith("git+") for a in c))
    assert "--no-deps" in package  # Colab's own torch stays
    assert not any("torch" in a for c in calls for a in c)


def test_setup_cell_locally_changes_nothing_when_installed(monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not install"))
    before = list(sys.path)
    exec(setup_source(NOTEBOOKS[0]), {})
    assert sys.path == before


def test_readme_leads_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(make \w+)\s*$", readme, re.M)
    assert commands[:2] == ["make lab", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lab:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "127.0.0.1" in makefile  # JupyterLab listens on loopback only


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n -B ARGS` would run, one per line (continuations joined)."""
    dry = subprocess.run(
        ["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    return dry.stdout.replace("\\\n", " ").splitlines()


def environment_of(command: str, **theirs: str | None) -> list[str]:
    """The environment the shell gives the venv's program in a make command, as NAME=value
    lines, for a user whose own environment sets (or, with None, lacks) the names in theirs."""
    env = {k: v for k, v in os.environ.items() if k not in theirs}
    env.update({k: v for k, v in theirs.items() if v is not None})
    prefix = re.split(r"\s\.venv/", command)[0]  # the assignments before the program
    shell = subprocess.run(
        ["sh", "-c", prefix + " env"], capture_output=True, text=True, env=env, check=True
    )
    return shell.stdout.splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_test_and_bench_start_python_with_one_malloc_arena():
    from lessons.tuning import MALLOC_TUNABLES

    commands = make_dry_run("lab", "test", "bench")
    for what in ("jupyter lab", "-m pytest", "-m lessons.bench", "-m widgets.bench"):
        line = next(c for c in commands if what in c)
        assert f"GLIBC_TUNABLES=${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{MALLOC_TUNABLES} " in line
        # and the shell makes of it what glibc reads, with a user's own tunables kept
        for theirs, expect in ((None, MALLOC_TUNABLES), ("a.b=1", f"a.b=1:{MALLOC_TUNABLES}")):
            assert f"GLIBC_TUNABLES={expect}" in environment_of(line, GLIBC_TUNABLES=theirs)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("workers", ["2", "0"])
def test_make_test_runs_in_worker_processes_that_share_out_the_cores(workers):
    commands = make_dry_run("test", f"TEST_WORKERS={workers}")
    line = next(c for c in commands if "-m pytest" in c)
    # nbval needs a notebook's cells in one process, in order: loadscope keeps each file together
    assert re.search(rf" -m pytest tests -n {workers} --dist loadscope ", line), line
    threads = max(1, (os.cpu_count() or 1) // max(1, int(workers)))
    for theirs, expect in ((None, threads), ("3", 3)):  # a user's own setting is kept
        assert f"OMP_NUM_THREADS={expect}" in environment_of(line, OMP_NUM_THREADS=theirs)


def test_the_colab_environment_is_pinned_to_ipywidgets_7_and_the_courses_torch():
    lines = (ROOT / "tests" / "colab-requirements.txt").read_text().splitlines()
    reqs = [line for line in lines if line.strip() and not line.startswith("#")]
    pins = dict(r.split("==") for r in reqs)
    assert len(pins) == len(reqs) and all(re.fullmatch(r"\d+(\.\d+)*", v) for v in pins.values())
    assert pins["ipywidgets"].startswith("7.") and pins["plotly"].startswith("5.")
    # the CPU build pip finds locally; any other torch would pull a CUDA build of several GB
    assert pins["torch"] == pins_from_pyproject()["torch"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_then_runs_the_notebooks_in_the_colab_environment():
    commands = make_dry_run("test")

    def first(pattern: str) -> int:
        return next(i for i, c in enumerate(commands) if re.search(pattern, c))

    main, colab = (
        first(r"\s\.venv/bin/python -m pytest tests "),
        first(r"\s\.venv-colab/bin/python -m pytest "),
    )
    assert main < colab
    line = commands[colab]
    assert "LESSONS_PLOT=matplotlib" in line and "LESSONS_PROFILE=ci" in line
    assert " tests/check_colab_env.py " in line
    assert re.search(r" --nbval-lax --nbval-current-env notebooks ", line), line
    install = [c for c in commands if ".venv-colab/bin/python -m pip install" in c]
    assert "-r tests/colab-requirements.txt" in install[0] and "--no-deps -e ." in install[-1]


def test_readme_has_a_colab_badge_per_notebook_for_the_setup_cells_repository():
    readme = (ROOT / "README.md").read_text()
    setup = "".join(json.loads(NOTEBOOKS[0].read_text())["cells"][0]["source"])
    repo = re.search(r'"LESSONS_REPO", "https://github.com/([^"]+)"', setup).group(1)
    badges = re.findall(
        r"\[!\[Open In Colab\]\([^)]+\)\]\(https://colab\.research\.google\.com/github/"
        r"([^/]+/[^/]+)/blob/main/(notebooks/[^)]+\.ipynb)\)",
        readme,
    )
    assert sorted(path for _, path in badges) == [f"notebooks/{nb.name}" for nb in NOTEBOOKS]
    assert {r for r, _ in badges} == {repo}


def test_readme_reliability_table_names_tests_that_exist():
    readme = (ROOT / "tests" / "README.md").read_text()
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", section)
    assert len(named) >= 12
    for path, name in named:
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, re.M), f"{path}::{name}"


@pytest.mark.parametrize("ci", ["true", ""])
def test_browser_tests_without_a_browser_fail_under_ci_and_skip_elsewhere(ci):
    env = {
        **{k: v for k, v in os.environ.items() if k != "CI"},
        "LESSONS_CHROMIUM": "/nonexistent/chromium",  # no browser here
        "CI": ci,
    }
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider"]
        + [str(ROOT / "tests/browser"), "-k", "matplotlib"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert "apt-get install chromium" in out.stdout, out.stdout
    if ci:
        assert out.returncode != 0 and "cannot run under CI" in out.stdout
    else:
        assert out.returncode == 0 and "1 skipped" in out.stdout
