"""One table of kernel timings: op, shape, provider, median ms, speedup vs the plain-PyTorch reference.

    python benchmarks/ops_table.py [--device cpu|cuda] [--repeats 5] [--quick]

Shapes come from the models (DeiT-B and ViT-L at 224², 16 calibration images): q/k scores per block,
value-filter and fc1 redundancy, the fc2-input Gram of the re-fit. Providers are filtered by
availability (the Triton interpreter on a CPU is not a performance path and is left out there);
every provider is checked once against the reference before it is timed. Writes
benchmarks/results/ops_<device>.md and .csv (with versions and device name).
"""
import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import snp_fast.ops as ops  # noqa: E402
from snp_fast.ops import reference  # noqa: E402

# (model, op, shape): qk (B, H, N, d, gamma), redundancy (rows, cols), gram (tokens, features)
CASES = [
    ('deit_base', 'qk_scores', (16, 12, 197, 64, 32)),
    ('vit_large', 'qk_scores', (16, 16, 197, 64, 32)),
    ('deit_base', 'redundancy_scores', (768, 768)),
    ('deit_base', 'redundancy_scores', (3072, 768)),
    ('vit_large', 'redundancy_scores', (1024, 1024)),
    ('vit_large', 'redundancy_scores', (4096, 1024)),
    ('vit_large', 'redundancy_scores', (1024, 4096)),  # fc2's rows: the embedding scores' widest producers
    ('deit_base', 'gram', (16 * 197, 3072)),
    ('vit_large', 'gram', (64 * 197, 4096)),
]
QUICK = {('deit_base', 'qk_scores'), ('vit_large', 'redundancy_scores'), ('deit_base', 'gram')}


def make_inputs(op, shape, device):
    g = torch.Generator().manual_seed(0)
    if op == 'qk_scores':
        b, h, n, d, gamma = shape
        q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
        return (q.to(device), k.to(device), gamma)
    return (torch.randn(*shape, generator=g).to(device),)


def providers(op, device):
    """name -> callable; the first is the baseline the speedups refer to."""
    out = {}
    if op == 'qk_scores':
        out['reference (literal N×N)'] = reference.qk_scores_literal
        out['reference (d×d torch)'] = reference.qk_scores_dxd
    elif op == 'redundancy_scores':
        out['reference'] = reference.redundancy_scores_full
    else:
        out['reference'] = lambda x: reference.gram_full(x)
    for b in ops.available_backends(op, device):
        if b == 'reference' or (b == 'triton' and device == 'cpu'):
            continue
        fn = {'qk_scores': ops.qk_scores, 'redundancy_scores': ops.redundancy_scores, 'gram': ops.gram}[op]
        out[b] = (lambda fn_, b_: lambda *a: fn_(*a, backend=b_))(fn, b)
        if op != 'qk_scores':  # precision="bf16": the same op of the inputs rounded to bfloat16
            out[f'{b} bf16'] = (lambda fn_, b_: lambda *a: fn_(*a, backend=b_, precision='bf16'))(fn, b)
    return out


def expected(provs, name, inputs):
    """What provider `name` must return: the reference's result, of the bf16-rounded inputs for a bf16 one."""
    if name.endswith(' bf16'):
        inputs = tuple(t.to(torch.bfloat16) for t in inputs)
    return next(iter(provs.values()))(*inputs)


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def median_ms(fn, args, device, repeats):
    fn(*args)
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def check(op, got, want):
    tol = {'qk_scores': 1e-3, 'redundancy_scores': 1e-3, 'gram': 1e-3}[op] * max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item()
    if err > tol:
        raise AssertionError(f'{op}: provider differs from the reference by {err:.3g} (tol {tol:.3g})')


def device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        model = platform.processor()
    return f'{model}, {torch.get_num_threads()} threads'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--quick', action='store_true', help='one shape per op')
    args = p.parse_args(argv)
    dev = args.device
    if dev == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for model, op, shape in CASES:
        if args.quick and (model, op) not in QUICK:
            continue
        inputs = make_inputs(op, shape, dev)
        provs = providers(op, dev)
        base_ms = None
        wants = {}  # the reference's result per input precision: computed once a case (the literal Q/K route is slow)
        for name, fn in provs.items():
            bf16 = name.endswith(' bf16')
            if bf16 not in wants:
                wants[bf16] = expected(provs, name, inputs)
            check(op, fn(*inputs), wants[bf16])
            reps = max(1, args.repeats // 2) if name.startswith('reference (literal') else args.repeats
            ms = median_ms(fn, inputs, dev, reps)
            base_ms = base_ms or ms
            rows.append(dict(op=op, model=model, shape='x'.join(map(str, shape)), provider=name,
                             median_ms=round(ms, 2), speedup=round(base_ms / ms, 2)))
            print(f'{op:18s} {model:10s} {rows[-1]["shape"]:18s} {name:24s} {ms:10.2f} ms  {base_ms / ms:6.2f}x',
                  flush=True)
    meta = f'device: {device_name(dev)}; torch {torch.__version__}; python {platform.python_version()}'
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'ops_{dev}.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ['meta'])
        w.writeheader()
        for r in rows:
            w.writerow({**r, 'meta': meta})
    with open(os.path.join(out_dir, f'ops_{dev}.md'), 'w') as f:
        f.write(f'{meta}\n\n| op | model | shape | provider | median ms | speedup vs first row |\n|---|---|---|---|---:|---:|\n')
        for r in rows:
            f.write(f'| {r["op"]} | {r["model"]} | {r["shape"]} | {r["provider"]} | {r["median_ms"]} | {r["speedup"]} |\n')
    print(meta)


if __name__ == '__main__':
    main()
