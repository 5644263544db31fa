"""Top-1 of each family's trained digits fixture before and after pruning 50 % of every width (q/k, v, FFN and the
residual stream or stage widths), with and without the re-fit (64 and 256 calibration images from the training
split, the 500 held-out digits):

    python -m research.family_quality            # prints the markdown table QUALITY.md quotes
"""
import argparse
import os
import sys
import time

import torch

import snp_fast
from snp_fast.demo import digits_data, load_digits_swin, load_digits_vit

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')


def _hf():
    sys.path.insert(0, TESTS)
    from hf_fixture import digits_hf_vit
    return digits_hf_vit()


FIXTURES = {'vit (timm, shipped digits ViT)': load_digits_vit,
            'hf_vit (transformers ViTForImageClassification, the same weights)': _hf,
            'swin (timm Swin, shipped digits Swin)': load_digits_swin}


def top1(model, x, y) -> float:
    with torch.no_grad():
        out = model(x)
    return float((getattr(out, 'logits', out).argmax(1) == y).float().mean())


def rows(ratio: float = 0.5, calib_counts=(64, 256)):
    x_tr, _, x_te, y_te = digits_data()
    out = []
    for (name, build), n_calib in ((f, n) for f in FIXTURES.items() for n in calib_counts):
        model = build()
        t = time.perf_counter()
        pruned, report = snp_fast.prune(model, x_tr[:n_calib], ratio)
        seconds = time.perf_counter() - t
        plain, _ = snp_fast.prune(model, x_tr[:n_calib], ratio, refit=False)
        out.append((name, n_calib, top1(model, x_te, y_te), top1(pruned, x_te, y_te), top1(plain, x_te, y_te),
                    report.macs_after / report.macs_before, seconds))
    return out


def markdown(table) -> str:
    lines = ['| family (fixture) | calibration images | top-1 | 50 % + re-fit | 50 %, no re-fit | MACs left | '
             'prune time |', '|---|---|---|---|---|---|---|']
    for name, n, t0, t1, t2, macs, sec in table:
        lines.append(f'| {name} | {n} | {t0:.1%} | {t1:.1%} ({100 * (t1 - t0):+.1f}) | {t2:.1%} | {macs:.1%} | '
                     f'{sec:.1f} s |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    torch.set_num_threads(2)
    print(markdown(rows()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
