"""Task 2: scikit-image's face / non-face subset (LFW faces vs other image patches, 25×25 grey, 2 classes) and
the small ViT trained on it, shipped as snp_fast/data/faces_vit.safetensors (tests/make_faces_checkpoint.py
re-creates it)."""
from typing import Tuple

import torch

from .train import train_classifier

__all__ = ['FACES_VIT', 'faces_data', 'faces_vit', 'load_faces_vit', 'faces_crop', 'train_faces_vit']

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
    test = torch.cat([torch.randperm(100, generator=g)[:n_test // 2],
                      100 + torch.randperm(100, generator=g)[:n_test // 2]])
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
    path = os.path.join(os.path.dirname(__file__), 'faces_vit.safetensors')
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

    train_classifier(model, x_tr, y_tr, epochs, seed, batch_size, lr, augment=crop_and_flip)
    return model.eval(), (faces_crop(x_tr), y_tr, faces_crop(x_te), y_te)
