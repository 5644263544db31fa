"""Re-create the second fixture: snp_fast/data/faces_vit.safetensors.

    python tests/make_faces_checkpoint.py [--epochs 150] [--seed 0]

A timm ViT (config snp_fast.demo.FACES_VIT: 24×24 grey input, 4×4 patches, 6 blocks, 4 heads, width 96)
trained from scratch by snp_fast.demo.train_faces_vit(seed=0) on scikit-image's lfw_subset (100 LFW faces,
100 non-face patches; 150 train / 50 held-out, stratified), random crops + flips. Weights are stored as
float16; the seed, epochs and held-out accuracy go in the file's metadata.
"""
import argparse
import os
import time

import torch
from safetensors.torch import save_file

from snp_fast.demo import accuracy, train_faces_vit

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--epochs', type=int, default=150)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, (_, _, x_te, y_te) = train_faces_vit(epochs=args.epochs, seed=args.seed)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})  # report the accuracy of what is stored
    acc = accuracy(model, x_te, y_te)
    out = os.path.join(os.path.dirname(__file__), '..', 'snp_fast', 'data', 'faces_vit.safetensors')
    save_file(state, out, metadata={'seed': str(args.seed), 'epochs': str(args.epochs), 'test_accuracy': f'{acc:.4f}',
                                    'torch': torch.__version__})
    print(f'wrote {out}: held-out accuracy {acc:.2%} on {len(y_te)} images ({time.perf_counter() - t0:.0f}s)')
