"""Calibration images for the command line: a folder of images, or real sample photos by default.

* load_folder(dir): an ImageFolder tree (class sub-folders) or a flat folder; every regular,
  non-hidden file is tried with PIL, and unreadable or non-image files are skipped and counted. When the
  folder holds more images than asked for, a seeded random subset is taken (so every class can appear).
* default photos: the real photos shipped with scikit-learn (china, flower) and scikit-image
  (astronaut, coffee, chelsea, rocket, ...), about 8. When more calibration images are asked for,
  seeded random crops (a quarter to all of the photo's area) and horizontal flips of those photos fill
  the rest: real image content, never noise.

Every PIL mode is converted with its range (convert_image: 16-bit / 257, float [0, 1] x 255, alpha over
white), not clipped by convert('RGB'). Images go through the model's own timm evaluation transform
(resolve_model_data_config + create_transform(is_training=False)), with the input size taken from the model.
"""
import os
import random
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['CalibError', 'CalibInfo', 'convert_image', 'data_config', 'eval_transform', 'list_files', 'load_folder',
           'sample_photos_pil', 'default_calib', 'load_calib', 'denormalize']


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


# The calibration batch may take at most this share of the memory available when loading starts: the list of
# images and their stacked copy coexist for a moment, and pruning then needs activations of the same batch.
MEMORY_SHARE = 0.25


def _available_memory() -> Optional[int]:
    """Bytes of memory available now (Linux: MemAvailable in /proc/meminfo); None where unknown."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(n: int, one: torch.Tensor, num: int) -> None:
    """CalibError when n images like `one` would take more than MEMORY_SHARE of the available memory (it
    was the OOM killer, after minutes of loading)."""
    avail = _available_memory()
    per = one.numel() * one.element_size()
    if avail is None or n * per <= MEMORY_SHARE * avail:
        return
    fit = max(1, int(MEMORY_SHARE * avail // per))
    raise CalibError(f'--num-calib {num}: {n} calibration images of {tuple(one.shape)} would take '
                     f'{n * per / 2**30:.1f} GiB, more than {MEMORY_SHARE:.0%} of the {avail / 2**30:.1f} GiB of '
                     f'memory available (pruning needs the rest); at most {fit} fit here')


# 16-bit modes PIL opens 16-bit grayscale PNG / TIFF as
_MODES_16 = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def convert_image(im, in_chans: int = 3):
    """A PIL image of any mode as 8-bit 'RGB' (in_chans 3) or 'L' (in_chans 1), with its range kept
    (PIL's convert('RGB') clips 16-bit and float images to white, or a [0, 1] float image to black):

    * 16-bit grayscale (I;16*): value / 257 (65535 -> 255).
    * 32-bit integer (I): values within [0, 255] are taken as 8-bit, within [0, 65535] as 16-bit (/ 257; a
      16-bit PNG opens as I in older Pillows), any other range is stretched from its min..max to 0..255.
    * float (F): within [0, 1] -> x 255; else within [0, 255] -> as it is; else its min..max -> 0..255.
      NaN/Inf pixels: ValueError (load_folder skips and counts the file).
    * with transparency (RGBA, LA, PA, P with a transparent colour): composited over white, not the hidden
      colour under transparent pixels.
    * 1 (bilevel): 0 / 255. CMYK, YCbCr, HSV, RGBX...: PIL's own conversion.
    """
    import numpy as np
    from PIL import Image
    target = 'L' if in_chans == 1 else 'RGB'
    mode = im.mode
    if mode in _MODES_16 or mode in ('I', 'F'):
        a = np.asarray(im).astype(np.float64)
        if a.ndim != 2:
            raise ValueError(f'a {mode} image of shape {a.shape} (expected one channel)')
        if not np.isfinite(a).all():
            raise ValueError(f'the {mode} image holds NaN/Inf pixels')
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode in _MODES_16:
            a = a / 257
        elif mode == 'F' and lo >= 0 and hi <= 1:
            a = a * 255
        elif lo >= 0 and hi <= 255:
            pass
        elif mode == 'I' and lo >= 0 and hi <= 65535:
            a = a / 257
        else:
            a = (a - lo) * (255 / (hi - lo))
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), 'L')
    elif mode == 'P':
        im = im.convert('RGBA' if 'transparency' in im.info else 'RGB')
    elif mode in ('LA', 'La', 'PA', 'RGBa'):
        im = im.convert('RGBA')
    if im.mode == 'RGBA':
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im if im.mode == target else im.convert(target)


def _open_rgb(path: str, in_chans: int):
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        return convert_image(im, in_chans)


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
        if len(images) == 1:
            _check_fits(min(num, len(order)), images[0], num)
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
    conv = lambda im: convert_image(im, in_chans)  # noqa: E731
    images = [transform(conv(im)) for _, im in photos[:1]]
    _check_fits(num, images[0], num)
    images += [transform(conv(im)) for _, im in photos[1:num]]
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
               progress: bool = True, config: Optional[dict] = None) -> Tuple[torch.Tensor, CalibInfo]:
    """Calibration images for `model`, preprocessed with its timm eval transform (or the one of `config`, a
    timm data config), as (B, C, H, W)."""
    if num < 1:
        raise CalibError(f'--num-calib must be >= 1, got {num}')
    if config is None:
        transform = eval_transform(model)
        in_chans = getattr(model, 'in_chans', 3)
    else:
        import timm.data
        transform = timm.data.create_transform(**config, is_training=False)
        in_chans = config['input_size'][0]
    if directory is None:
        return default_calib(transform, num, seed, in_chans)
    return load_folder(directory, transform, num, seed, in_chans, progress)
