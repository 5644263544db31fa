"""A transformers model from a local save_pretrained folder, offline, and the preprocessing its image processor
config describes (as timm's data-config keys, so calibration and evaluation run through timm's transforms)."""
import json
import os
from typing import Optional

import torch.nn as nn

from .structure import CLASSES

__all__ = ['is_pretrained_dir', 'load_pretrained_dir', 'data_config_from_dir']

_RESAMPLE = {0: 'nearest', 2: 'bilinear', 3: 'bicubic'}  # PIL's codes, as image processors store them


def is_pretrained_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))


def load_pretrained_dir(path: str) -> nn.Module:
    """The model of a save_pretrained folder (its config's architecture, one of CLASSES), read offline; ValueError
    naming the folder otherwise."""
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    arch = (config.get('architectures') or [None])[0]
    if arch not in CLASSES:
        raise ValueError(f'{path}: config.json names architecture {arch!r}; snp_fast prunes {list(CLASSES)}')
    import transformers
    return getattr(transformers, arch).from_pretrained(path, local_files_only=True).eval()


def data_config_from_dir(path: str, model: nn.Module) -> Optional[dict]:
    """timm-style data config (input_size, mean, std, interpolation, crop_pct, crop_mode) from the folder's
    preprocessor_config.json (a ViT / DeiT / DINOv2 image processor); None when the folder has none."""
    p = os.path.join(path, 'preprocessor_config.json')
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        proc = json.load(f)
    chans = model.config.num_channels
    size = proc.get('crop_size') if proc.get('do_center_crop') else proc.get('size')
    if isinstance(size, dict):
        h, w = size.get('height', size.get('shortest_edge')), size.get('width', size.get('shortest_edge'))
    else:
        h = w = size or model.config.image_size
    resize = proc.get('size') or {}
    edge = resize.get('shortest_edge') if isinstance(resize, dict) else None
    crop_pct = min(h, w) / edge if proc.get('do_center_crop') and edge else 1.0
    return {'input_size': (chans, h, w), 'mean': tuple(proc.get('image_mean', (0.5,) * chans)),
            'std': tuple(proc.get('image_std', (0.5,) * chans)),
            'interpolation': _RESAMPLE.get(proc.get('resample', 2), 'bilinear'), 'crop_pct': crop_pct,
            'crop_mode': 'center'}
