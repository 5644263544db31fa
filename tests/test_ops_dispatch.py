"""The dispatch table of snp_fast.ops: backend names that say what an implementation is ("reference",
"compiled", "triton"), the device left to torch's dispatcher, the deprecated "cpu" / "cuda" aliases, and
every op schema declared once (csrc/snp_fast.cpp) with a fake kernel for each."""
import os
import re
import warnings

import pytest
import torch

import snp_fast.ops as ops
from snp_fast.ops import dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
has_ext = pytest.mark.skipif(ops.extension() is None, reason='compiled extension not built')


def test_backend_names():
    assert ops.BACKENDS == ('auto', 'reference', 'compiled', 'triton')
    assert set(dispatch._TABLE) == set(ops.OPS)
    for op in ops.OPS:
        assert 'reference' in ops.available_backends(op, 'cpu')
        assert not {'cpu', 'cuda'} & set(ops.available_backends(op, 'cpu'))
    with pytest.raises(ValueError, match='unknown op'):
        dispatch.register('not_an_op', 'triton')
    with pytest.raises(ValueError, match='unknown backend'):
        dispatch.register('gram', 'cpu')  # (aliases are accepted by callers, never registered)


@has_ext
def test_compiled_is_the_torch_op_whatever_the_device():
    """"compiled" is one entry per op, available where the tensor's dispatch key has a kernel."""
    for op in ops.OPS:
        assert ops.available_backends(op, 'cpu')[:2] == ['reference', 'compiled'], op
        assert dispatch.resolve(op, 'compiled', 'cpu') is dispatch._TABLE[op]['compiled']
        assert ('compiled' in ops.available_backends(op, 'cuda')) == ops.has_kernel(op, 'CUDA'), op
    x = torch.randn(20, 7)
    assert torch.equal(ops.gram(x, backend='compiled'), torch.ops.snp_fast.gram(x))


@has_ext
def test_deprecated_aliases_warn_once_and_keep_their_device():
    """"cpu" and "cuda" still work as before: "compiled" on a tensor of that device type, with a
    DeprecationWarning once per alias; on the other device they are refused as they were."""
    dispatch._warned.discard(('alias', 'cpu'))
    w = torch.randn(30, 5)
    with pytest.warns(DeprecationWarning, match="backend='cpu' is deprecated"):
        got = ops.redundancy_scores(w, backend='cpu')
    assert torch.equal(got, ops.redundancy_scores(w, backend='compiled'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ops.redundancy_scores(w, backend='cpu')  # (once)
        ops.check_backend('cpu', 'cpu')
        with ops.prefer('cpu'):
            assert dispatch.resolve('gram', 'auto', 'cpu') is dispatch._TABLE['gram']['compiled']
    with pytest.warns(DeprecationWarning) if ('alias', 'cuda') not in dispatch._warned else warnings.catch_warnings():
        with pytest.raises(ValueError, match="backend='cuda' has no kernel for a model on cpu"):
            ops.check_backend('cuda', 'cpu')
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available for gram on cpu"):
        ops.gram(w, backend='cuda')
    with ops.prefer('cuda'):  # a preference for another device: the usual order
        assert dispatch.resolve('gram', 'auto', 'cpu') is dispatch._TABLE['gram']['compiled']
    for bad in ('gpu', 'CPU', 'cpp'):
        with pytest.raises(ValueError, match='not known'):
            ops.check_backend(bad, 'cpu')
        with pytest.raises(ValueError, match='unknown backend'):
            ops.gram(w, backend=bad)


def test_auto_order_is_unchanged_on_cpu():
    """backend="auto" on a CPU tensor: the compiled kernel where there is one, else the reference (the
    golden pruning results depend on it, tests/test_golden.py)."""
    for op in ops.OPS:
        want = 'compiled' if 'compiled' in ops.available_backends(op, 'cpu') else 'reference'
        assert dispatch.resolve(op, 'auto', 'cpu') is dispatch._TABLE[op][want], op


def _cpp_sources():
    for d, _, files in os.walk(os.path.join(ROOT, 'csrc')):
        for f in files:
            if f.endswith(('.cpp', '.cu', '.h', '.cuh')):
                yield os.path.join(d, f)


def _schemas():
    """op name -> schema string, from csrc/snp_fast.cpp's TORCH_LIBRARY block."""
    src = open(os.path.join(ROOT, 'csrc', 'snp_fast.cpp')).read()
    return dict(re.findall(r'm\.def\("(\w+)(\(.*?\) -> [^"]+)"\)', src))


def test_every_schema_is_declared_once_in_cpp():
    """Only csrc/snp_fast.cpp declares schemas (one TORCH_LIBRARY, no fragments, no m.def elsewhere); the
    Python package declares none (no torch.library.define / Library(..., "DEF") / custom_op)."""
    for path in _cpp_sources():
        src = open(path).read()
        rel = os.path.relpath(path, ROOT)
        assert not re.search(r'TORCH_LIBRARY_FRAGMENT\s*\(', src), rel
        if not rel.endswith('snp_fast.cpp'):
            assert 'TORCH_LIBRARY(' not in src and 'm.def(' not in src, rel
    schemas = _schemas()
    assert set(ops.OPS) <= set(schemas), set(ops.OPS) - set(schemas)
    for d, _, files in os.walk(os.path.join(ROOT, 'snp_fast')):
        for f in files:
            if f.endswith('.py'):
                src = open(os.path.join(d, f)).read()
                for pattern in (r'library\.define\(', r'custom_op\(', r'triton_op\(', r"Library\([^)]*DEF"):
                    assert not re.search(pattern, src), (f, pattern)


@has_ext
def test_every_compiled_op_has_a_fake_and_its_schema():
    """Each schema of csrc/snp_fast.cpp is registered as declared there, and has a fake kernel (Meta
    shapes for torch.compile): register_fake only attaches to an existing schema."""
    from torch._library.simple_registry import singleton
    for name, sig in _schemas().items():
        op = getattr(torch.ops.snp_fast, name).default
        assert str(op._schema) == f'snp_fast::{name}{sig}', name
        assert singleton.find(f'snp_fast::{name}').fake_impl.kernel is not None, f'no fake kernel for {name}'
