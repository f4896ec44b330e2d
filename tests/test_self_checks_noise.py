"""Lesson 4's self-checks can fail: with the idea of one noise profile reached two ways (decay the
learning rate, or grow the batch) taken out of the library, notebook 04 runs on the ci profile
until the cell that states the claim, and its assertion fails there."""

import pytest

from tests.test_self_checks import assert_claim_fails

NOTEBOOK = "04_noise_scale.ipynb"

# name: (the patch that takes the idea out, the assertion that must fail)
CASES = {
    "grow batch that keeps the base batch": (
        "import lessons.noise as N\nN.matching_batch = lambda batch, n, k: batch\n",
        "assert track < unit",  # grow batch is then the null run, apart from decay lr
    ),
    "a plan that ignores the batch schedule": (
        "import lessons.plan as P\nP.scheduled_batch = lambda c, epoch: int(c.batch)\n",
        "assert track < unit",
    ),
    "decay lr that keeps the base lr": (
        "import lessons.noise as N\n"
        "N.milestones_fn = lambda base, factor, milestones: (lambda epoch: base)\n",
        "assert track < unit",  # decay lr is then the null run, apart from grow batch
    ),
    "the noise scale without the -1": (
        "import lessons.noise as N\n"
        "N.noise_scale = lambda lr, n, batch, momentum=0.0: lr / (1 - momentum) * n / batch\n",
        "assert all(0.8 < box < 1.25",  # SGD's spread on the quadratics at B = 150 of 200
    ),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
@pytest.mark.usefixtures("private_run_log")
def test_notebook_04s_check_fails_without_the_lessons_idea(case):
    patch, claim = CASES[case]
    assert_claim_fails(NOTEBOOK, patch, (claim,))
