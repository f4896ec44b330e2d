"""The notebooks' self-checks can fail: with a lesson's idea taken out of the library, the
notebook runs on the ci profile until a cell that states the lesson's claim asserts it, and that
assertion fails. Each case injects its patch as a cell right after the setup cell."""

import copy

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import ROOT
from widgets.notebook_bench import failing_line, plain_traceback

# name: (notebook, the patch that takes the idea out, the assertion that must fail)
CASES = {
    "EMA without bias correction": (
        "01_discounting_half_life_ema.ipynb",
        "import lessons.ema as E\n"
        "_ema = E.ema\n"
        "E.ema = lambda x, beta, debias=False: _ema(x, beta, debias=False)\n",
        "E.ema(np.full(30, 3.0), 0.999, debias=True)",
    ),
    "a per-step beta carried unchanged": (
        "02_deriving_beta_one_over_b.ipynb",
        "import lessons.scaling as S\nS.scale_beta = lambda beta, from_batch, to_batch: beta\n",
        "half_life(moved_beta) * b2_",
    ),
    "hyperparameters carried to the new batch unchanged": (
        "02_deriving_beta_one_over_b.ipynb",
        "import lessons.scaling as S\n"
        "S.transfer = lambda hparams, from_batch, to_batch, rule: dict(hparams)\n",
        "dist[1] / dist[0]",  # torch SGD's distance per sample, kept by the rule
    ),
    "Adam's learning rate carried unchanged (betas moved)": (
        "02_deriving_beta_one_over_b.ipynb",
        "import lessons.scaling as S\n"
        "_transfer = S.transfer\n"
        "def _lr_kept(hparams, from_batch, to_batch, rule):\n"
        "    moved = _transfer(hparams, from_batch, to_batch, rule)\n"
        "    return {**moved, 'lr': hparams['lr']} if 'betas' in hparams else moved\n"
        "S.transfer = _lr_kept\n",
        'measured["lamb (b=32)"] < min(2 * spread',  # the rule within seed spread
    ),
    "LAMB without its trust ratio": (
        "03_lamb_internals.ipynb",
        "import torch\n"
        "from lessons.lamb import Lamb\n"
        "Lamb._norms = staticmethod(lambda tensors, kind: torch.ones(len(tensors)))\n",
        'row["relative"] - inspector.lr.value',  # each tensor moves lr x ||w||
    ),
}


def _failing_line(name: str, patch: str) -> tuple[str, str]:
    """Run notebook ``name`` with ``patch`` after its setup cell; the line that raised (as
    IPython's traceback marks it) and the error's name (("", "") if every cell ran)."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nb = copy.deepcopy(nb)
    nb.cells.insert(1, nbformat.v4.new_code_cell(patch))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT / "notebooks"}}
    )
    try:
        client.execute()
    except CellExecutionError as e:
        return failing_line(e) or plain_traceback(e), e.ename
    return "", ""


def assert_claim_fails(name: str, patch: str, claims: tuple[str, ...]) -> None:
    """Notebook ``name``, patched, stops with an AssertionError on a line holding one of
    ``claims`` (the assertions that state the lesson's claim)."""
    line, error = _failing_line(name, patch)
    assert error == "AssertionError", (name, error, line)
    assert any(claim in line for claim in claims), (name, line)


@pytest.mark.parametrize("case", CASES, ids=CASES)
@pytest.mark.usefixtures("private_run_log")
def test_a_notebooks_check_fails_without_the_lessons_idea(case):
    name, patch, claim = CASES[case]
    assert_claim_fails(name, patch, (claim,))
