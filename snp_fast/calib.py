"""Calibration images for the command line: a folder of images, or real sample photos by default.

* load_folder(dir): an ImageFolder tree (class sub-folders) or a flat folder; every regular,
  non-hidden file is tried with PIL, and unreadable or non-image files are skipped and counted. When the
  folder holds more images than asked for, a seeded random subset is taken (so every class can appear).
* default photos: the real photos shipped with scikit-learn (china, flower) and scikit-image
  (astronaut, coffee, chelsea, rocket, ...), about 8. When more calibration images are asked for,
  seeded random crops (a quarter to all of the photo's area) and horizontal flips of those photos fill
  the rest: real image content, never noise.

Images go through the model's own timm evaluation transform (resolve_model_data_config +
create_transform(is_training=False)), with the input size taken from the model itself.
"""
import os
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['CalibError', 'CalibInfo', 'data_config', 'eval_transform', 'list_files', 'load_folder', 'sample_photos_pil',
           'default_calib', 'load_calib', 'denormalize']


class CalibError(ValueError):
    """No usable calibration images (missing or empty folder, nothing readable)."""


@dataclass
class CalibInfo:
    source: str
    loaded: int
    skipped: int = 0
    skipped_examples: List[str] = field(default_factory=list)
    augmented: int = 0
    files: List[str] = field(default_factory=list)

    def describe(self) -> str:
        s = f'calibration: {self.loaded} images from {self.source}'
        if self.augmented:
            s += f' ({self.augmented} of them random crops/flips of the photos)'
        if self.skipped:
            s += (f'; skipped {self.skipped} unreadable or non-image file{"s" if self.skipped > 1 else ""} '
                  f'(e.g. {", ".join(self.skipped_examples)})')
        return s

    def to_dict(self) -> dict:
        return {'source': self.source, 'loaded': self.loaded, 'skipped': self.skipped, 'augmented': self.augmented}


def data_config(model: nn.Module) -> dict:
    """timm's data config for the model, with the input size read off the model (img_size overrides) and
    mean / std given per input channel: timm's defaults are RGB's three, whatever in_chans is (a 1-channel
    model, e.g. on grayscale images, gets their average)."""
    import timm.data
    cfg = dict(timm.data.resolve_model_data_config(model))
    img = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    chans = getattr(model, 'in_chans', None) or cfg['input_size'][0]
    if img is not None:
        cfg['input_size'] = (chans, *tuple(img))
    for key in ('mean', 'std'):
        v = tuple(cfg[key])
        if len(v) != chans:
            cfg[key] = (sum(v) / len(v),) if chans == 1 else tuple(v[i % len(v)] for i in range(chans))
    return cfg


def eval_transform(model: nn.Module) -> Callable:
    import timm.data
    return timm.data.create_transform(**data_config(model), is_training=False)


def denormalize(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(C, H, W) normalised image -> [0, 1] for display."""
    cfg = data_config(model)
    mean = torch.tensor(cfg['mean']).view(-1, 1, 1)
    std = torch.tensor(cfg['std']).view(-1, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1)


def list_files(directory: str) -> List[str]:
    """Regular, non-hidden files under `directory` (recursively), sorted."""
    out = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith('.')]
    return out


def _open_rgb(path: str, in_chans: int):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return im.convert('L' if in_chans == 1 else 'RGB')


def load_folder(directory: str, transform: Callable, num: int, seed: int = 0, in_chans: int = 3,
                progress: bool = True) -> Tuple[torch.Tensor, CalibInfo]:
    if not os.path.exists(directory):
        raise CalibError(f'--calib {directory}: no such directory')
    if not os.path.isdir(directory):
        raise CalibError(f'--calib {directory}: not a directory')
    files = list_files(directory)
    if not files:
        raise CalibError(f'--calib {directory}: the folder is empty (expected images, flat or in class sub-folders)')
    order = list(files)
    random.Random(seed).shuffle(order)
    from tqdm import tqdm
    images, used, skipped = [], [], []
    bar = tqdm(total=min(num, len(order)), desc='calibration images', unit='img', disable=not progress, leave=False)
    for path in order:
        if len(images) >= num:
            break
        try:
            im = _open_rgb(path, in_chans)
        except Exception:  # noqa: BLE001 -- PIL raises many kinds of errors for non-images
            skipped.append(path)
            continue
        images.append(transform(im))
        used.append(path)
        bar.update(1)
    bar.close()
    if not images:
        raise CalibError(f'--calib {directory}: none of its {len(files)} files is a readable image')
    info = CalibInfo(directory, len(images), len(skipped), [os.path.relpath(p, directory) for p in skipped[:3]],
                     files=[os.path.relpath(p, directory) for p in used])
    return torch.stack(images), info


def sample_photos_pil() -> List[Tuple[str, 'object']]:
    """(name, PIL image) for the real photos shipped with scikit-learn and scikit-image."""
    import numpy as np
    from PIL import Image
    out = []
    try:
        from sklearn.datasets import load_sample_images
        s = load_sample_images()
        out += [(os.path.basename(f), Image.fromarray(np.asarray(im))) for f, im in zip(s.filenames, s.images)]
    except Exception:  # noqa: BLE001 -- scikit-learn missing: fall back to scikit-image only
        pass
    try:
        from skimage import data as skdata
        for name in ('astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle_left', 'immunohistochemistry'):
            try:
                a = np.asarray(getattr(skdata, name)())
            except Exception:  # noqa: BLE001 -- a missing sample means one photo fewer
                continue
            if a.ndim == 2:
                a = np.stack([a] * 3, -1)
            out.append((name, Image.fromarray(a[..., :3].astype(np.uint8))))
    except ImportError:
        pass
    return out


def default_calib(transform: Callable, num: int, seed: int = 0, in_chans: int = 3) -> Tuple[torch.Tensor, CalibInfo]:
    from PIL import Image
    photos = sample_photos_pil()
    if not photos:
        raise CalibError('no default calibration photos: install scikit-learn or scikit-image, or pass --calib DIR')
    conv = (lambda im: im.convert('L')) if in_chans == 1 else (lambda im: im)
    images = [transform(conv(im)) for _, im in photos[:num]]
    rng = random.Random(seed)
    augmented = 0
    while len(images) < num:
        _, im = photos[augmented % len(photos)]
        w, h = im.size
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw = max(8, min(w, int(round((area * aspect) ** 0.5))))
        ch = max(8, min(h, int(round((area / aspect) ** 0.5))))
        x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = im.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(transform(conv(crop)))
        augmented += 1
    names = [n for n, _ in photos]
    return torch.stack(images), CalibInfo(f'{len(photos)} sample photos shipped with scikit-learn/scikit-image',
                                          len(images), augmented=augmented, files=names)


def load_calib(model: nn.Module, directory: Optional[str] = None, num: int = 64, seed: int = 0,
               progress: bool = True) -> Tuple[torch.Tensor, CalibInfo]:
    """Calibration images for `model`, preprocessed with its timm eval transform, as (B, C, H, W)."""
    if num < 1:
        raise CalibError(f'--num-calib must be >= 1, got {num}')
    transform = eval_transform(model)
    in_chans = getattr(model, 'in_chans', 3)
    if directory is None:
        return default_calib(transform, num, seed, in_chans)
    return load_folder(directory, transform, num, seed, in_chans, progress)
