"""Latency of an original vs a pruned model: eager PyTorch, optionally torch.compile and ONNX Runtime.

    rows = snp_fast.bench.compare(original, pruned, batch_sizes=(1, 8), repeats=10, backends=('eager', 'onnx'))
    print(snp_fast.bench.format_table(rows))

Each measurement: `warmup` untimed calls, then the MEDIAN wall time of `repeats` timed calls on a
fixed random input (latency does not depend on the weights or the image). Inference mode, eval().
compare() interleaves the two models call by call (original, pruned, original, ...), so a change in
machine load during the run affects both alike (this matters on a shared CPU).
ONNX Runtime runs the model exported by snp_fast.export (CPU provider unless CUDA is available and the
model is on a GPU) with as many intra-op threads as torch uses (torch.get_num_threads()), so both
runtimes get the same cores.
"""
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .macs import example_input

__all__ = ['BACKENDS', 'time_call', 'latency', 'compare', 'format_table']

BACKENDS = ('eager', 'compile', 'onnx')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], repeats: int = 10, warmup: int = 3, device=None) -> float:
    """Median seconds of `repeats` calls of fn() after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')
    device = torch.device(device or 'cpu')
    for _ in range(max(0, warmup)):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _OnnxRunner:
    def __init__(self, model: nn.Module, example: torch.Tensor, tmpdir: str, name: str):
        import onnxruntime as ort
        from .export import export_onnx
        path = os.path.join(tmpdir, f'{name}.onnx')
        export_onnx(model, path, example=example[:1], verbose=False)
        providers = ['CPUExecutionProvider']
        if example.is_cuda and 'CUDAExecutionProvider' in ort.get_available_providers():
            providers.insert(0, 'CUDAExecutionProvider')
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor):
        return self.session.run(None, {self.input_name: x.detach().cpu().numpy()})


def _runner(model: nn.Module, backend: str, input_size, tmpdir: Optional[str], name: str) -> Callable:
    if backend == 'eager':
        return model
    if backend == 'compile':
        return torch.compile(model, dynamic=False)
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:   # the session holds the model in memory
        return _OnnxRunner(model, example_input(model, 1, input_size), d, name)


def _check(backend: str, batch_sizes: Sequence[int], repeats: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    for b in batch_sizes:
        if int(b) < 1:
            raise ValueError(f'batch sizes must be >= 1, got {b}')
    if repeats < 1:
        raise ValueError(f'repeats must be >= 1, got {repeats}')


def latency(model: nn.Module, batch_sizes: Sequence[int] = (1, 8), backend: str = 'eager', repeats: int = 10,
            warmup: int = 3, input_size=None, tmpdir: Optional[str] = None, name: str = 'model') -> Dict[int, float]:
    """{batch size: median seconds per forward pass} of `model` with one backend."""
    _check(backend, batch_sizes, repeats)
    model = model.eval()
    device = next(model.parameters()).device
    out = {}
    with torch.inference_mode() if backend != 'onnx' else torch.no_grad():
        fn = _runner(model, backend, input_size, tmpdir, name)
        for b in batch_sizes:
            x = example_input(model, b, input_size)
            out[b] = time_call(lambda: fn(x), repeats, warmup + (2 if backend == 'compile' else 0), device)
    return out


def _interleaved(fns: List[Callable[[], object]], repeats: int, warmup: int, device) -> List[float]:
    """Median seconds of each fn, timed in turns (fn0, fn1, fn0, fn1, ...)."""
    for _ in range(max(0, warmup)):
        for fn in fns:
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def compare(original: nn.Module, pruned: Optional[nn.Module] = None, batch_sizes: Sequence[int] = (1, 8),
            backends: Sequence[str] = ('eager',), repeats: int = 10, warmup: int = 3, input_size=None,
            progress: bool = False) -> List[dict]:
    """One row per (backend, batch size): original and pruned median latency (ms) and the speedup.

    The two models are timed in alternation (see the module docstring)."""
    from tqdm import tqdm
    for be in backends:
        _check(be, batch_sizes, repeats)
    models = [m.eval() for m in ((original, pruned) if pruned is not None else (original,))]
    device = next(original.parameters()).device
    rows = []
    bar = tqdm(total=len(backends) * len(batch_sizes), desc='latency', disable=not progress, leave=False)
    for be in backends:
        with torch.inference_mode() if be != 'onnx' else torch.no_grad():
            fns = [_runner(m, be, input_size, None, name) for m, name in zip(models, ('original', 'pruned'))]
            for bs in batch_sizes:
                xs = [example_input(m, bs, input_size) for m in models]
                t = _interleaved([lambda f=f, x=x: f(x) for f, x in zip(fns, xs)], repeats,
                                 warmup + (2 if be == 'compile' else 0), device)
                row = {'backend': be, 'batch': bs, 'original_ms': t[0] * 1e3}
                if pruned is not None:
                    row.update(pruned_ms=t[1] * 1e3, speedup=t[0] / t[1])
                rows.append(row)
                bar.update(1)
    bar.close()
    return rows


def format_table(rows: List[dict], macs_ratio: Optional[float] = None) -> str:
    has_pruned = any('pruned_ms' in r for r in rows)
    head = f'{"backend":<8} {"batch":>5} {"original ms":>12}'
    if has_pruned:
        head += f' {"pruned ms":>10} {"speedup":>8}'
    lines = [head]
    for r in rows:
        line = f'{r["backend"]:<8} {r["batch"]:>5} {r["original_ms"]:>12.2f}'
        if has_pruned:
            line += f' {r["pruned_ms"]:>10.2f} {r["speedup"]:>7.2f}x'
        lines.append(line)
    if macs_ratio is not None:
        lines.append(f'MACs ratio original/pruned: {macs_ratio:.2f}x (the ideal speedup)')
    return '\n'.join(lines)
