"""Task 1: scikit-learn's handwritten digits (8×8 grey images, 10 classes) and the small ViT and Swin trained on
them, shipped as snp_fast/data/digits_vit.safetensors and swin_digits.safetensors (tests/make_digits_checkpoint.py
and tests/make_swin_digits_checkpoint.py re-create them)."""
from typing import Tuple

import torch

from .train import train_classifier

__all__ = ['DIGITS_VIT', 'digits_data', 'digits_vit', 'load_digits_vit', 'train_digits_vit', 'DIGITS_SWIN',
           'digits_swin', 'load_digits_swin', 'train_digits_swin']

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
    path = os.path.join(os.path.dirname(__file__), 'digits_vit.safetensors')
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def train_digits_vit(epochs: int = 80, seed: int = 0, batch_size: int = 32, lr: float = 1e-3, **overrides):
    """Train the digits ViT from scratch (deterministic for a seed); returns (model, data)."""
    torch.manual_seed(seed)
    data = digits_data(seed=seed)
    x_tr, y_tr = data[0], data[1]
    model = digits_vit(**overrides)
    train_classifier(model, x_tr, y_tr, epochs, seed, batch_size, lr)
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
    path = os.path.join(os.path.dirname(__file__), 'swin_digits.safetensors')
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def train_digits_swin(epochs: int = 100, seed: int = 0, batch_size: int = 64, lr: float = 3e-3, **overrides):
    """Train the digits Swin from scratch (deterministic for a seed); returns (model, data)."""
    torch.manual_seed(seed)
    data = digits_data(seed=seed)
    model = digits_swin(**overrides)
    train_classifier(model, data[0], data[1], epochs, seed, batch_size, lr)
    return model.eval(), data
