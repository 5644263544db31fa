"""Whole-model prune time by phase, as a ratio to one plain calibration forward pass.

    python benchmarks/prune_table.py                              # vit_large_patch16_224, 16 images
    python benchmarks/prune_table.py --model deit_small_patch16_224 --images 64 --backends auto,reference
    python benchmarks/prune_table.py --precisions fp32,bf16                 # bf16 products (see prune())

Each configuration runs in its own subprocess so that its peak memory (max RSS) is its own. Models are
random-init (no weights can be downloaded here): timing does not depend on the weights. Calibration
images are the real sample photos shipped with scikit-learn / scikit-image (and their mirror images and
crops, to reach --images). Writes benchmarks/results/prune_<model>_<device>.md.
"""
import argparse
import itertools
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def calibration_images(n: int, size: int):
    import torch
    from snp_fast.demo import sample_photos
    base = sample_photos(size + size // 8)
    out, g = [], torch.Generator().manual_seed(0)
    while len(out) < n:
        for im in base:
            t, l = torch.randint(0, size // 8 + 1, (2,), generator=g).tolist()
            crop = im[:, t:t + size, l:l + size]
            out.append(crop.flip(-1) if len(out) % 2 else crop)
    return torch.stack(out[:n])


def run_one(cfg: dict) -> dict:
    """One measurement (in a fresh process): plain forward, then prune; returns times and max RSS."""
    import resource
    import time
    import warnings
    import timm
    import torch
    import snp_fast
    warnings.simplefilter('ignore')
    torch.manual_seed(0)
    device = torch.device(cfg['device'])
    model = timm.create_model(cfg['model'], pretrained=False).eval().to(device)
    size = model.patch_embed.img_size[0]
    x = calibration_images(cfg['images'], size).to(device)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        model(x[:2])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(x), cfg['batch']):
            model(x[s:s + cfg['batch']])
        if device.type == 'cuda':
            torch.cuda.synchronize()
        fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned, report = snp_fast.prune(model, x, ratios=cfg['ratios'], refit=cfg['refit'], backend=cfg['backend'],
                                    batch_size=cfg['batch'], refit_tokens=cfg.get('refit_tokens'),
                                    precision=cfg.get('precision', 'fp32'))
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(cfg, forward_s=fwd, prune_s=total, phases=report.times, model_mb=model_mb,
                peak_rss_mb=rss, rss_before_mb=rss0, macs_before=report.macs_before, macs_after=report.macs_after)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='vit_large_patch16_224')
    ap.add_argument('--images', type=int, default=16)
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--ratio', type=float, default=0.5)
    ap.add_argument('--backends', default='auto')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--refit-tokens', type=int, default=None)
    ap.add_argument('--precisions', default='fp32', help='comma-separated: fp32, bf16')
    ap.add_argument('--one', help=argparse.SUPPRESS)  # internal: run one JSON config, print the JSON result
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    rows = []
    for backend, precision, refit in itertools.product(args.backends.split(','), args.precisions.split(','),
                                                       (False, True)):
        cfg = dict(model=args.model, images=args.images, batch=args.batch, ratios=args.ratio, refit=refit,
                   backend=backend, device=args.device, refit_tokens=args.refit_tokens, precision=precision)
        out = subprocess.run([sys.executable, __file__, '--one', json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{backend:>9} {precision} refit={refit!s:5} forward {r['forward_s']:.2f}s  prune {r['prune_s']:.2f}s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (model {r['model_mb']:.0f} MB)", flush=True)
    phases = ['calibration', 'qk_scoring', 'redundancy', 'selection', 'slicing', 'refit', 'rebuild']
    head = ('| backend | precision | re-fit | plain forward (s) | ' + ' | '.join(phases)
            + ' | beyond calibration | total prune (s) | peak RSS / fp32 model |')
    lines = [f'### {args.model}, {args.images} calibration images, ratio {args.ratio} '
             f'({platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {args.device})', '',
             'Each phase: seconds (ratio to the plain forward pass over the same images).', '', head,
             '|' + '---|' * (len(phases) + 7)]
    for r in rows:
        f = r['forward_s']
        beyond = sum(v for k, v in r['phases'].items() if k != 'calibration')
        cells = [f"{r['phases'].get(p, 0):.2f} ({r['phases'].get(p, 0) / f:.2f}x)" for p in phases]
        lines.append(f"| {r['backend']} | {r['precision']} | {'on' if r['refit'] else 'off'} | {f:.2f} | " + ' | '.join(cells)
                     + f" | {beyond:.2f} ({beyond / f:.2f}x) | {r['prune_s']:.2f} | "
                     f"{(r['peak_rss_mb'] - r['rss_before_mb'] + r['model_mb']) / r['model_mb']:.2f} |")
    table = '\n'.join(lines)
    print('\n' + table)
    os.makedirs(os.path.join(HERE, 'results'), exist_ok=True)
    path = os.path.join(HERE, 'results', f'prune_{args.model}_{args.device}.md')
    with open(path, 'w') as fh:
        fh.write(table + '\n')
    print(f'\nwritten to {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
