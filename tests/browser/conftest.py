"""JupyterLab on 127.0.0.1 (random port, random token) serving a copy of the notebooks, and
Debian's Chromium driven by Playwright. Under CI=true a missing browser fails the run;
elsewhere the browser tests skip and say how to get one. A failing test leaves a screenshot
and the server's log in artifacts/browser/."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
INSTALL = (
    "install a browser with `apt-get install chromium` (Debian/Ubuntu) and `pip install "
    "playwright` (no `playwright install` needed), or set LESSONS_CHROMIUM to its path"
)


def find_chromium() -> str | None:
    explicit = os.environ.get("LESSONS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _missing(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run under CI: {reason}; {INSTALL}", pytrace=False)
    pytest.skip(f"{reason}: {INSTALL}")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        _missing("no Chromium found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """One JupyterLab server; ``url(path)`` opens a notebook of its root."""

    def __init__(self, root: Path, env: dict, log: Path):
        self.root, self.port, self.token = root, _free_port(), secrets.token_hex(16)
        self.log_path = log
        self.workspaces = 0
        settings = root.parent / f"{root.name}-settings"
        notes = settings / "@jupyterlab" / "apputils-extension"
        notes.mkdir(parents=True, exist_ok=True)  # no "fetch news?" toast over the notebook
        (notes / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        cmd = [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.expose_app_in_browser=True",  # window.jupyterapp for run-all and checks
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={settings}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self.log, stderr=self.log)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(self.url("api/status"), timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"JupyterLab did not start: see {log}") from None
                time.sleep(0.3)

    def workspace(self) -> str:
        self.workspaces += 1
        return f"test{self.workspaces}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _start_lab(tmp_path_factory, plot: str) -> Lab:
    root = tmp_path_factory.mktemp(f"lab-{plot}")
    # a copy: run-all and autosave must never write outputs into the repository's notebooks
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    env = {
        **os.environ,
        "LESSONS_PROFILE": os.environ.get("LESSONS_PROFILE", "ci"),
        "LESSONS_DEVICE": "cpu",
        "LESSONS_PLOT": plot,
        "LESSONS_RUNS": str(root.parent / f"{root.name}-runs"),  # no runs replayed from before
        "JUPYTER_CONFIG_DIR": str(root.parent / f"{root.name}-config"),
        "JUPYTER_RUNTIME_DIR": str(root.parent / f"{root.name}-runtime"),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return Lab(root, env, ARTIFACTS / f"jupyterlab-{plot}.log")


@pytest.fixture(scope="session")
def lab(chromium_path, tmp_path_factory):
    server = _start_lab(tmp_path_factory, "plotly")
    yield server
    server.close()


@pytest.fixture(scope="session")
def lab_matplotlib(chromium_path, tmp_path_factory):
    server = _start_lab(tmp_path_factory, "matplotlib")
    yield server
    server.close()


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium_path, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    # the browser's own errors, for the failure report: a widget that failed in JavaScript
    # shows nothing in the notebook, and the console is where it says why
    page.console_errors = []
    page.on(
        "console",
        lambda m: m.type == "error" and page.console_errors.append(m.text[:500]),
    )
    page.on("pageerror", lambda e: page.console_errors.append(f"uncaught: {e}"[:500]))
    yield page
    try:  # each test's kernel goes: the next notebook gets the machine to itself
        page.evaluate("() => window.jupyterapp.serviceManager.sessions.shutdownAll()")
    except Exception:
        pass  # the page never loaded JupyterLab; the server goes at the end anyway
    context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "page" in item.funcargs:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in item.nodeid)
        path = ARTIFACTS / f"{name}.png"
        errors = getattr(item.funcargs["page"], "console_errors", [])
        report.sections.append(("browser console errors", "\n".join(errors[-30:]) or "none"))
        try:
            item.funcargs["page"].screenshot(path=str(path), full_page=True)
            report.sections.append(("screenshot", str(path)))
        except Exception as e:  # the page may be gone; the failure itself is what matters
            report.sections.append(("screenshot", f"could not be taken: {e}"))
