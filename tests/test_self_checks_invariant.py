"""Lessons 5 and 6's self-checks can fail: with invariant Adam's idea taken out of the library,
notebooks 05 and 06 run on the ci profile until the cell that states the claim, and its
assertion fails there (tests.test_self_checks.assert_claim_fails)."""

import pytest

from tests.test_self_checks import assert_claim_fails


def everywhere(code: str) -> str:
    """A patch cell that runs ``code`` in the kernel and in every process it starts: the
    torchrun workers import it from a sitecustomize module on PYTHONPATH (which
    lessons.distributed.launch passes on)."""
    return (
        "import os, tempfile, pathlib\n"
        f"_code = {code!r}\n"
        "exec(_code)\n"
        "_folder = tempfile.mkdtemp(prefix='patch-')\n"
        "pathlib.Path(_folder, 'sitecustomize.py').write_text(_code)\n"
        "os.environ['PYTHONPATH'] = os.pathsep.join("
        "filter(None, [_folder, os.environ.get('PYTHONPATH')]))\n"
    )


# v from the squared mean of the micro-batch gradients, as standard Adam computes it
SQUARED_MEAN = everywhere(
    """
from lessons import invariant_adam as IA
_count = IA.InvariantAdamW._reduced_count
def _squared_mean(self):
    k = _count(self)  # the sums of every rank added up, as before
    for state in self.state.values():
        if "grad_sum" in state and k:
            state["grad_sq_sum"].copy_(state["grad_sum"] ** 2 / k)  # k (mean g)^2
    return k
IA.InvariantAdamW._reduced_count = _squared_mean
"""
)

# every rank steps on its own micro-batches: the sums are never all-reduced
NO_REDUCTION = everywhere(
    """
from lessons import invariant_adam as IA
IA.InvariantAdamW._reduced_count = lambda self: self.micro_batches
"""
)

# name: (notebook, the patch, the assertions of which one must fail)
CASES = {
    "lesson 5: v from the squared mean gradient": (
        "05_micro_batch_variance.ipynb",
        SQUARED_MEAN,
        (
            "assert measured[INVARIANT] < 2 * noise",  # the sweep spread, if it shows there
            "assert adam_fall > 1.2 and invariant_spread < adam_fall**0.5",  # v, where it must
        ),
    ),
    "lesson 6: v from the squared mean gradient": (
        "06_invariant_adam_across_processes.ipynb",
        SQUARED_MEAN,
        ("assert abs(inv_ratio - 1) < (std_ratio - 1) / 2",),
    ),
    "lesson 6: the ranks' sums never reduced": (
        "06_invariant_adam_across_processes.ipynb",
        NO_REDUCTION,
        ("assert gap < rel",),  # D.assert_same_run: 2 workers took the one-process steps
    ),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
@pytest.mark.usefixtures("private_run_log")
def test_notebooks_05_and_06s_checks_fail_without_invariant_adams_idea(case):
    assert_claim_fails(*CASES[case])
