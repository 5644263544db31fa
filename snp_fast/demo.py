"""The main job on an embedded default, with no internet: `python -m snp_fast.demo`.

1. Loads the small timm ViT shipped in snp_fast/data (trained here on scikit-learn's handwritten
   digits: real data, 8×8 images, 2×2 patches, 6 blocks, 4 heads, width 128; 96.6 % on 500 held-out
   digits), or trains it from scratch with --train (seeded, ~4-7 minutes on 2 CPU cores).
2. Prunes it with SNP + re-fit at 50 % of q/k, v, fc1 and embedding dims, from 64 training images,
   and prints accuracy, params and MACs before/after and the time per phase; does the same without
   the re-fit for comparison.
3. Prunes deit_small_patch16_224 (random init: no weights can be downloaded) with
   the authors' 2.0 GMACs preset on real sample photos and prints the summary.
"""
import argparse
import time
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['digits_data', 'digits_vit', 'load_digits_vit', 'train_digits_vit', 'digits_swin', 'load_digits_swin',
           'train_digits_swin', 'faces_data', 'faces_vit', 'load_faces_vit', 'faces_crop', 'train_faces_vit',
           'accuracy', 'sample_photos']

DIGITS_VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=6, num_heads=4,
                  mlp_ratio=4.0)


def digits_data(n_test: int = 500, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn digits as (x_train, y_train, x_test, y_test); images (N, 1, 8, 8), standardised."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def digits_vit(**overrides):
    import timm
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, **{**DIGITS_VIT, **overrides})


def load_digits_vit():
    """The digits ViT shipped with the package (tests/make_digits_checkpoint.py made it)."""
    import os
    from safetensors.torch import load_file
    model = digits_vit()
    path = os.path.join(os.path.dirname(__file__), 'data', 'digits_vit.safetensors')
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def _train(model, x_tr, y_tr, epochs: int, seed: int, batch_size: int, lr: float, augment=None) -> None:
    """The fixtures' training loop: AdamW + one-cycle schedule, shuffled batches from a seeded generator."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(y_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=gen)
        for s in range(0, len(perm), batch_size):
            idx = perm[s:s + batch_size]
            xb = x_tr[idx] if augment is None else augment(x_tr[idx], gen)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def train_digits_vit(epochs: int = 80, seed: int = 0, batch_size: int = 32, lr: float = 1e-3, **overrides):
    """Train the digits ViT from scratch (deterministic for a seed); returns (model, data)."""
    torch.manual_seed(seed)
    data = digits_data(seed=seed)
    x_tr, y_tr = data[0], data[1]
    model = digits_vit(**overrides)
    _train(model, x_tr, y_tr, epochs, seed, batch_size, lr)
    return model.eval(), data


# The same task for a Swin Transformer: 1x1 patches (an 8x8 grid), windows of 4 (stage 0: four windows and a
# shifted block; stage 1 after patch merging: one 4x4 window), widths 32 / 64.
DIGITS_SWIN = dict(img_size=8, patch_size=1, in_chans=1, num_classes=10, embed_dim=32, depths=(2, 2),
                   num_heads=(2, 4), window_size=4, drop_path_rate=0.0)


def digits_swin(**overrides):
    import timm
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, **{**DIGITS_SWIN, **overrides})


def load_digits_swin():
    """The digits Swin shipped with the package (tests/make_swin_digits_checkpoint.py made it)."""
    import os
    from safetensors.torch import load_file
    model = digits_swin()
    path = os.path.join(os.path.dirname(__file__), 'data', 'swin_digits.safetensors')
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def train_digits_swin(epochs: int = 100, seed: int = 0, batch_size: int = 64, lr: float = 3e-3, **overrides):
    """Train the digits Swin from scratch (deterministic for a seed); returns (model, data)."""
    torch.manual_seed(seed)
    data = digits_data(seed=seed)
    model = digits_swin(**overrides)
    _train(model, data[0], data[1], epochs, seed, batch_size, lr)
    return model.eval(), data


# A second task: scikit-image's face / non-face subset (LFW faces vs other image patches), 25×25 grey.
FACES_VIT = dict(img_size=24, patch_size=4, in_chans=1, num_classes=2, embed_dim=96, depth=6, num_heads=4,
                 mlp_ratio=4.0)


def faces_data(n_test: int = 50, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """skimage.data.lfw_subset() as (x_train, y_train, x_test, y_test): images (N, 1, 25, 25), standardised
    with the training split's mean and std; label 1 = face (the first 100 images), 0 = non-face. The split is
    stratified (n_test/2 of each)."""
    from skimage.data import lfw_subset
    x = torch.tensor(lfw_subset(), dtype=torch.float32).unsqueeze(1)
    y = (torch.arange(len(x)) < 100).long()
    g = torch.Generator().manual_seed(seed)
    test = torch.cat([torch.randperm(100, generator=g)[:n_test // 2], 100 + torch.randperm(100, generator=g)[:n_test // 2]])
    train = torch.tensor(sorted(set(range(len(x))) - set(test.tolist())))
    x = (x - x[train].mean()) / x[train].std()
    return x[train], y[train], x[test], y[test]


def faces_vit(**overrides):
    import timm
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, **{**FACES_VIT, **overrides})


def load_faces_vit():
    """The faces ViT shipped with the package (tests/make_faces_checkpoint.py made it); it takes the
    top-left 24×24 crop of the 25×25 images (faces_crop()) at test time."""
    import os
    from safetensors.torch import load_file
    model = faces_vit()
    path = os.path.join(os.path.dirname(__file__), 'data', 'faces_vit.safetensors')
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def faces_crop(x: torch.Tensor, top: int = 0, left: int = 0) -> torch.Tensor:
    """24×24 crop of 25×25 face images (top, left in {0, 1}); the held-out crop is (0, 0)."""
    return x[..., top:top + 24, left:left + 24]


def train_faces_vit(epochs: int = 150, seed: int = 0, batch_size: int = 25, lr: float = 1e-3, **overrides):
    """Train the faces ViT from scratch (deterministic for a seed), with random 24×24 crops and horizontal
    flips; returns (model, data) where data's images are already the top-left 24×24 crops."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = faces_data(seed=seed)
    model = faces_vit(**overrides)

    def crop_and_flip(xb, gen):  # drawn after each batch's indices, from the same generator
        top, left, flip = torch.randint(0, 2, (3,), generator=gen).tolist()
        xb = faces_crop(xb, top, left)
        return xb.flip(-1) if flip else xb

    _train(model, x_tr, y_tr, epochs, seed, batch_size, lr, augment=crop_and_flip)
    return model.eval(), (faces_crop(x_tr), y_tr, faces_crop(x_te), y_te)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = sum((model(x[s:s + batch_size]).argmax(-1) == y[s:s + batch_size]).sum().item()
                  for s in range(0, len(y), batch_size))
    return correct / len(y)


def sample_photos(size: int = 224) -> torch.Tensor:
    """Real photos that ship with scikit-learn and scikit-image, ImageNet-normalised, (N, 3, size, size)."""
    import numpy as np
    images = []
    from sklearn.datasets import load_sample_images
    images += list(load_sample_images().images)
    try:
        from skimage import data as skdata
        for name in ('astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle_left', 'immunohistochemistry'):
            try:
                images.append(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 -- a missing sample just means one photo fewer
                pass
    except ImportError:
        pass
    out = []
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    for im in images:
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        t = torch.tensor(im[..., :3], dtype=torch.float32).permute(2, 0, 1) / 255.0
        s = min(t.shape[1:])
        top, left = (t.shape[1] - s) // 2, (t.shape[2] - s) // 2
        t = F.interpolate(t[:, top:top + s, left:left + s].unsqueeze(0), size=(size, size), mode='bilinear',
                          align_corners=False, antialias=True)[0]
        out.append((t - mean) / std)
    return torch.stack(out)


def main(argv=None) -> int:
    import snp_fast
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--ratio', type=float, default=0.5, help='fraction of q/k, v, fc1 and embedding dims removed')
    ap.add_argument('--calib', type=int, default=256, help='calibration images (from the training split)')
    ap.add_argument('--train', action='store_true', help='train the digits ViT from scratch instead of loading it')
    ap.add_argument('--epochs', type=int, default=80, help='training epochs with --train')
    ap.add_argument('--no-deit', action='store_true', help='skip the deit_small_patch16_224 preset example')
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.perf_counter()
    if args.train:
        model, (x_tr, y_tr, x_te, y_te) = train_digits_vit(epochs=args.epochs)
        how = f'trained in {time.perf_counter() - t0:.1f}s'
    else:
        model, (x_tr, y_tr, x_te, y_te) = load_digits_vit(), digits_data()
        how = 'shipped checkpoint'
    acc0 = accuracy(model, x_te, y_te)
    print(f'ViT on scikit-learn digits ({snp_fast.count_params(model) / 1e6:.2f}M params, {how}): '
          f'test accuracy {acc0:.2%} on {len(y_te)} held-out images')
    calib = x_tr[:args.calib]
    for refit in (True, False):
        pruned, report = snp_fast.prune(model, calib, ratios=args.ratio, refit=refit)
        acc = accuracy(pruned, x_te, y_te)
        print(f'\nSNP {"+ re-fit" if refit else "alone (no re-fit)"}, {args.ratio:.0%} of q/k, v, fc1 and embedding '
              f'removed, {args.calib} calibration images: accuracy {acc0:.2%} -> {acc:.2%}')
        print(report.summary())
    if not args.no_deit:
        import timm
        photos = sample_photos()
        m = timm.create_model('deit_small_patch16_224', pretrained=False).eval()
        pruned, report = snp_fast.prune(m, photos, preset='deit_small_patch16_224')
        print(f'\ndeit_small_patch16_224 (RANDOM init: no weights can be downloaded here), authors\' 2.0G preset, '
              f'{len(photos)} real sample photos:')
        print(report.summary())
    print(f'\ndone in {time.perf_counter() - t0:.1f}s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
