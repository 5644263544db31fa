"""EfficientFormer-L1 presets: MACs, params, CPU latency; optionally a quality check on digits.

    python benchmarks/efficientformer.py            # presets: GMACs, params, latency (1 thread, interleaved runs)
    python benchmarks/efficientformer.py --digits   # + a tiny L1-shaped model trained on digits (~8 min on 1 core)

No ImageNet weights here: the L1 numbers are sizes and timings of randomly initialised models. The digits
check trains a small EfficientFormer (stage widths 16/24/32/48, depths 1/1/2/2, input 193x193 = the
smallest that maps onto the attention's 7x7 grid) and prunes it at uniform ratios with and without re-fit.
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F

import snp_fast
from snp_fast.families import efficientformer as ef

PRESETS = ('efficientformer_l1_0p6G', 'efficientformer_l1_0p5G')


def presets(rounds: int = 7) -> None:
    torch.set_num_threads(1)
    m = timm.create_model('efficientformer_l1', pretrained=False).eval()
    models = {'original': m}
    print(f'{"model":<26} {"GMACs":>6} {"params":>8}  stage widths')
    print(f'{"original":<26} {snp_fast.count_macs(m) / 1e9:>6.3f} {snp_fast.count_params(m) / 1e6:>7.2f}M  '
          f'{ef.model_dims(m).stages}')
    for name in PRESETS:  # weights-only pruning: sizes and speed do not depend on the calibration data
        p, r = snp_fast.prune(m, None, preset=name, refit=False, qk_criterion='magnitude')
        models[name] = p.eval()
        print(f'{name:<26} {r.macs_after / 1e9:>6.3f} {r.params_after / 1e6:>7.2f}M  {ef.model_dims(p).stages}')
    with torch.no_grad():
        for b in (1, 8):
            x = torch.randn(b, 3, 224, 224)
            times = {k: [] for k in models}
            for _ in range(rounds):  # interleaved, so that load from other processes hits every model alike
                for k, mod in models.items():
                    t = time.perf_counter()
                    mod(x)
                    times[k].append(time.perf_counter() - t)
            base = min(times['original'])
            print(f'batch {b}, 1 thread: ' + ', '.join(f'{k} {min(v) * 1e3:.1f} ms ({base / min(v):.2f}x)'
                                                    for k, v in times.items()))


def digits(epochs: int = 15, size: int = 193) -> None:
    from snp_fast.demo import digits_data
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    up = lambda x: F.interpolate(x, size=size, mode='nearest')  # noqa: E731
    m = timm.create_model('efficientformer_l1', pretrained=False, depths=(1, 1, 2, 2), embed_dims=(16, 24, 32, 48),
                          num_classes=10, in_chans=1, layer_scale_init_value=0.1)
    opt = torch.optim.AdamW(m.parameters(), 3e-3, weight_decay=0.01)
    batch = 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(ytr) + batch - 1) // batch))
    for _ in range(epochs):
        m.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(m(up(xtr[idx])), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()

    def acc(model):
        with torch.no_grad():
            return sum((model(up(xte[i:i + 100])).argmax(1) == yte[i:i + 100]).sum().item()
                       for i in range(0, len(yte), 100)) / len(yte)

    macs0 = snp_fast.count_macs(m, (1, size, size))
    print(f'digits EfficientFormer: {acc(m):.1%} on {len(yte)} held-out images, {macs0 / 1e6:.1f} MMACs')
    calib = up(xtr[:64])
    for r in (0.25, 0.325, 0.3875, 0.5):
        res = {}
        for refit in (False, True):
            p, _ = snp_fast.prune(m, calib, r, refit=refit)
            res[refit] = acc(p)
        print(f'uniform ratio {r}: {snp_fast.count_macs(p, (1, size, size)) / macs0:.0%} of MACs, '
              f'{res[True]:.1%} with re-fit, {res[False]:.1%} without (64 calibration images)')


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--digits', action='store_true', help='also train and prune a tiny model on digits')
    args = ap.parse_args()
    presets()
    if args.digits:
        digits()
