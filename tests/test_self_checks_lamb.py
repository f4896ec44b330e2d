"""Lesson 3's self-checks can fail: more ways of taking the trust ratio's idea out of
``lessons.lamb``, each failing nb03 in the cell that states the claim it breaks (the harness is
tests/test_self_checks.py's)."""

import pytest

from tests.test_self_checks import assert_claim_fails

NOTEBOOK = "03_lamb_internals.ipynb"

# name: (the patch that takes the idea out, the assertion that must fail)
CASES = {
    "LAMB's trust cap never applied": (
        "from lessons.lamb import Lamb\n"
        "_step = Lamb._step_group\n"
        "Lamb._step_group = lambda self, group, scale: _step(\n"
        "    self, {**group, 'trust_clip': None}, scale\n"
        ")\n",
        'b["moved"] < 0.999',  # a capped step moves less than lr x ||w||
    ),
    "one trust ratio for the whole network, not per tensor": (
        "import torch\n"
        "from lessons.lamb import Lamb\n"
        "Lamb._norms = staticmethod(\n"
        "    lambda tensors, kind: torch.linalg.vector_norm(\n"
        "        torch.stack(torch._foreach_norm(tensors))\n"
        "    ).expand(len(tensors))\n"
        ")\n",
        'row["relative"] - inspector.lr.value',  # each tensor moves lr x its own ||w||
    ),
}


@pytest.mark.parametrize("case", CASES, ids=CASES)
@pytest.mark.usefixtures("private_run_log")
def test_nb03_fails_without_the_trust_ratios_idea(case):
    patch, claim = CASES[case]
    assert_claim_fails(NOTEBOOK, patch, (claim,))
