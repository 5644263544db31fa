"""pytest-benchmark timings of every kernel against its plain-PyTorch reference, at model shapes.

    pytest benchmarks/bench_ops.py --benchmark-only [-k qk_scores]

Same cases and providers as benchmarks/ops_table.py (which prints one table); each provider is checked
once against the reference before it is timed.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_table import CASES, check, expected, make_inputs, providers, sync  # noqa: E402

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
PARAMS = [(model, op, shape, name) for model, op, shape in CASES for name in providers(op, DEVICE)]


@pytest.mark.parametrize('model,op,shape,provider', PARAMS,
                         ids=[f'{op}-{model}-{"x".join(map(str, s))}-{n}' for model, op, s, n in PARAMS])
def test_bench(benchmark, model, op, shape, provider):
    inputs = make_inputs(op, shape, DEVICE)
    provs = providers(op, DEVICE)
    fn = provs[provider]
    check(op, fn(*inputs), expected(provs, provider, inputs))

    def run():
        fn(*inputs)
        sync(DEVICE)
    rounds = 2 if provider.startswith('reference (literal') or op == 'gram' else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
