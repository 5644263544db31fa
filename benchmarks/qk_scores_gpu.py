"""Q/K scores for one ViT-L block of a prune on the GPU: the Triton kernel against the compiled hybrid.

    python benchmarks/qk_scores_gpu.py [--images 64] [--heads 16] [--tokens 197] [--dim 64] [--gamma 32]
                                       [--repeats 5] [--blocks 24]

One call = one block (images × heads problems). Checks first: the Triton kernel against the float64 literal
oracle on 4 images (tests/test_ops.py's tolerance rule) and against the hybrid on all of them; then times
the median of --repeats calls of each provider (CUDA-synchronised) and projects a prune (× --blocks).
Also reports the Jacobi sweeps the kernel needed. Writes benchmarks/results/qk_scores_<device>.md.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import snp_fast.ops as ops  # noqa: E402
from snp_fast.ops import reference  # noqa: E402


def literal(q, k, gamma, dtype):
    """The literal N×N formula in `dtype` with the float32 σ threshold the kernels implement (in float64
    it is the oracle; tests/test_ops.py: literal_all_gammas)."""
    qc, kc = q.to(dtype), k.to(dtype)
    u, s, vh = torch.linalg.svd(qc @ kc.transpose(-1, -2), full_matrices=False)
    valid = s > s[..., :1] * reference.singular_value_rtol(torch.float32)
    qn, kn = qc.norm(dim=-2).unsqueeze(-2), kc.norm(dim=-2).unsqueeze(-2)
    cu = torch.where(qn > 0, (u.transpose(-1, -2) @ qc) / qn.clamp_min(1e-300), 0.0)
    cv = torch.where(kn > 0, (vh @ kc) / kn.clamp_min(1e-300), 0.0)
    return ((cu * cv).abs() * valid.unsqueeze(-1))[..., :gamma, :].sum(-2).sum(0).double()


def timed(fn, repeats, device):
    out, times = None, []
    for _ in range(repeats + 1):  # the first call compiles / warms up
        if device == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--images', type=int, default=64)
    ap.add_argument('--heads', type=int, default=16)
    ap.add_argument('--tokens', type=int, default=197)
    ap.add_argument('--dim', type=int, default=64)
    ap.add_argument('--gamma', type=int, default=32)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--blocks', type=int, default=24)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = ap.parse_args(argv)
    dev = args.device
    from snp_fast.ops.triton.qk_scores import MAX_SWEEPS, _launch
    g = torch.Generator().manual_seed(0)
    shape = (args.images, args.heads, args.tokens, args.dim)
    # ViT-like activations: a few loud directions on top of noise (not i.i.d. Gaussian)
    mix = torch.randn(args.dim, args.dim, generator=g) * torch.logspace(0, -2, args.dim)
    q = (torch.randn(shape, generator=g) @ mix).to(dev)
    k = (torch.randn(shape, generator=g) @ mix.t() + 0.3).to(dev)

    # correctness first
    small_q, small_k = q[:4].cpu(), k[:4].cpu()
    want = literal(small_q, small_k, args.gamma, torch.float64)
    lit32 = (literal(small_q, small_k, args.gamma, torch.float32) - want).abs().max().item()
    got = ops.qk_scores(small_q.to(dev), small_k.to(dev), args.gamma, backend='triton').cpu()
    err = (got.double() - want.double()).abs().max().item()
    tol = 2 * lit32 + 8 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
    print(f'triton vs float64 literal oracle (4 images): max err {err:.3g}, tolerance {tol:.3g} '
          f'(float32 literal route: {lit32:.3g})')
    ok = err <= tol

    rows = []
    providers = {'triton': lambda: ops.qk_scores(q, k, args.gamma, backend='triton')}
    if 'compiled' in ops.available_backends('qk_scores', dev):
        providers['compiled (hybrid: Grams on GPU, eigen on host)'] = \
            lambda: ops.qk_scores(q, k, args.gamma, backend='compiled')
    results = {}
    for name, fn in providers.items():
        out, sec = timed(fn, args.repeats, dev)
        results[name] = out
        rows.append((name, sec))
        print(f'{name}: {sec * 1e3:.2f} ms per block, {sec * args.blocks:.3f} s per prune ({args.blocks} blocks)')
    if len(results) > 1:
        a, b = results.values()
        diff = (a.double() - b.double()).abs().max().item()
        print(f'triton vs hybrid, all images: max diff {diff:.3g} (scores up to {b.abs().max().item():.3g})')
        ok &= diff <= 1e-3 * max(1.0, b.abs().max().item())
    _, sweeps = _launch(q, k, args.gamma, block_n=32, max_sweeps=MAX_SWEEPS)
    sw = sweeps.float()
    print(f'Jacobi sweeps per problem: mean {sw.mean().item():.2f}, max {int(sw.max().item())} (cap {MAX_SWEEPS})')

    os.makedirs(os.path.join(os.path.dirname(__file__), 'results'), exist_ok=True)
    name = 'cuda' if dev == 'cuda' else dev
    device_name = torch.cuda.get_device_name() if dev == 'cuda' else platform.processor() or platform.machine()
    path = os.path.join(os.path.dirname(__file__), 'results', f'qk_scores_{name}.md')
    with open(path, 'w') as f:
        f.write(f'Q/K scores, one block: {shape} (B, H, N, d), gamma {args.gamma}; {device_name}, torch '
                f'{torch.__version__}; Jacobi sweeps mean {sw.mean().item():.2f} max {int(sw.max().item())}\n\n')
        f.write(f'| provider | ms per block | s per prune ({args.blocks} blocks) |\n|---|---|---|\n')
        for n, sec in rows:
            f.write(f'| {n} | {sec * 1e3:.2f} | {sec * args.blocks:.3f} |\n')
        f.write(f'\ntriton vs float64 oracle (4 images): {err:.3g} (tolerance {tol:.3g})\n')
    print('wrote', path)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
