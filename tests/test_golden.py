"""Behaviour pinned across refactors: every configuration of tests/golden/make_golden.py (each family, every
group, head and branch dropping, both re-fit modes, no re-fit, weight-only and activation criteria, bf16, a
token budget) must select the same indices and produce bit-identical pruned weights as when golden.json was
recorded (on the code before the pipeline refactor)."""
import json
import os
import sys

import pytest
import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
sys.path.insert(0, HERE)
import make_golden  # noqa: E402

with open(os.path.join(HERE, 'golden.json')) as f:
    GOLDEN = json.load(f)


def test_every_configuration_is_recorded():
    assert sorted(GOLDEN) == sorted(make_golden.CONFIGS)


@pytest.mark.parametrize('name', sorted(make_golden.CONFIGS))
def test_golden(name):
    torch.set_num_threads(2)  # as recorded: a BLAS with another thread count may round sums differently
    got = make_golden.run(name)
    want = GOLDEN[name]
    assert got['dims_after'] == want['dims_after']
    assert got['selection'] == want['selection']
    assert got['weights'] == want['weights']
