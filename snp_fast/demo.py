"""The main job on an embedded default, with no internet: `python -m snp_fast.demo`.

1. Loads the small timm ViT shipped in snp_fast/data/ (trained here on scikit-learn's handwritten
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

import torch

from .data import (DIGITS_SWIN, DIGITS_VIT, FACES_VIT, accuracy, digits_data, digits_swin, digits_vit, faces_crop,
                   faces_data, faces_vit, load_digits_swin, load_digits_vit, load_faces_vit, sample_photos,
                   train_digits_swin, train_digits_vit, train_faces_vit)

# the data and fixtures live in snp_fast.data; re-exported here for the imports that still name snp_fast.demo
__all__ = ['main', 'DIGITS_VIT', 'digits_data', 'digits_vit', 'load_digits_vit', 'train_digits_vit', 'DIGITS_SWIN',
           'digits_swin', 'load_digits_swin', 'train_digits_swin', 'FACES_VIT', 'faces_data', 'faces_vit',
           'load_faces_vit', 'faces_crop', 'train_faces_vit', 'accuracy', 'sample_photos']


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
        model, (x_tr, _, x_te, y_te) = train_digits_vit(epochs=args.epochs)
        how = f'trained in {time.perf_counter() - t0:.1f}s'
    else:
        model, (x_tr, _, x_te, y_te) = load_digits_vit(), digits_data()
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
