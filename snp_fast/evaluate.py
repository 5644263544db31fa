"""Accuracy of a (pruned) model on an image folder, streamed through timm's data pipeline.

    result = snp_fast.evaluate.evaluate_folder(model, 'imagenet/val')     # top-1, top-5, mean loss, images/s

The folder is an ImageFolder tree read by timm's own folder reader (class indices follow the sorted class
folders, as timm and torchvision do, so ImageNet synset folders map as usual). Images go through the model's
timm evaluation transform (calib.data_config: input size, mean / std, interpolation, crop_pct, each
overridable); every PIL mode is converted with its range (calib.convert_image); unreadable files are skipped
and counted, never replaced by another image. Memory does not grow with the number of images: batches
stream from a DataLoader (`workers` processes).
"""
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calib import convert_image, data_config

__all__ = ['EvalResult', 'FolderDataset', 'folder_loader', 'evaluate', 'evaluate_folder', 'DATA_KEYS']

# the data-config keys a caller may override (timm's names)
DATA_KEYS = ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    images: int
    skipped: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float('nan')

    def to_dict(self) -> dict:
        return {**asdict(self), 'images_per_s': self.images_per_s}

    def __str__(self) -> str:
        return (f'top-1 {self.top1:.2%}, top-5 {self.top5:.2%}, loss {self.loss:.4f}, {self.images} images'
                f'{f" ({self.skipped} unreadable skipped)" if self.skipped else ""}, {self.images_per_s:.1f} images/s')


class FolderDataset(torch.utils.data.Dataset):
    """An ImageFolder tree through timm's folder reader; an unreadable image yields a flag, not another image."""

    def __init__(self, root: str, transform: Callable, in_chans: int = 3):
        from timm.data.readers.reader_image_folder import ReaderImageFolder
        if not os.path.isdir(root):
            raise ValueError(f'data folder {root} does not exist')
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
        if not classes:
            raise ValueError(f'data folder {root} has no class sub-folders (an ImageFolder tree: one folder per class)')
        try:
            self.reader = ReaderImageFolder(root)
        except RuntimeError as e:  # timm's reader refuses a tree without images
            raise ValueError(f'data folder {root} holds no images ({e})') from None
        self.classes: List[str] = sorted(self.reader.class_to_idx, key=self.reader.class_to_idx.get)
        self.transform, self.in_chans = transform, in_chans

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        from PIL import Image
        path, target = self.reader.samples[i]
        try:
            with Image.open(path) as im:
                im.load()  # (decoded inside the `with`: convert_image may hand back this very image)
                img = convert_image(im, self.in_chans)
            return self.transform(img), target, True
        except (OSError, ValueError, SyntaxError):  # truncated, corrupt, not an image, NaN pixels
            c, h, w = self._size
            return torch.zeros(c, h, w), target, False

    _size = (3, 1, 1)


def _collate(batch):
    ok = torch.tensor([b[2] for b in batch])
    x = torch.stack([b[0] for b in batch if b[2]]) if ok.any() else None
    y = torch.tensor([b[1] for b in batch if b[2]], dtype=torch.long)
    return x, y, int((~ok).sum())


def folder_loader(root: str, config: dict, batch_size: int = 64, workers: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader over an ImageFolder tree with timm's evaluation transform for `config` (a data config)."""
    import timm.data
    transform = timm.data.create_transform(**config, is_training=False)
    ds = FolderDataset(root, transform, config['input_size'][0])
    ds._size = tuple(config['input_size'])
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_collate, persistent_workers=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None, progress: bool = False) -> EvalResult:
    """Top-1 / top-5 accuracy and mean cross-entropy of `model` over `loader`'s (images, targets, skipped)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_classes = len(getattr(loader.dataset, 'classes', []))
    was_training = model.training
    model.eval()
    correct1 = correct5 = images = skipped = 0
    loss = 0.0
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc='eval', unit='batch')
    t0 = time.perf_counter()
    try:
        for x, y, bad in it:
            skipped += bad
            if x is None:
                continue
            out = model(x.to(device))
            logits = getattr(out, 'logits', out).float()
            if n_classes and logits.shape[1] != n_classes:
                raise ValueError(f'the model has {logits.shape[1]} outputs but the data has {n_classes} classes')
            y = y.to(device)
            loss += float(F.cross_entropy(logits, y, reduction='sum'))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            images += y.numel()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    if images == 0:
        raise ValueError('no readable images to evaluate')
    return EvalResult(correct1 / images, correct5 / images, loss / images, images, skipped, seconds)


def evaluate_folder(model: nn.Module, root: str, batch_size: int = 64, workers: int = 2,
                    config: Optional[dict] = None, progress: bool = False, **overrides) -> EvalResult:
    """evaluate() over an ImageFolder tree, preprocessed by `config` (default: for a pruned model the data config
    its recipe recorded from the original, else the model's own, calib.data_config) with `overrides` (DATA_KEYS)."""
    bad = set(overrides) - set(DATA_KEYS)
    if bad:
        raise ValueError(f'unknown data-config keys {sorted(bad)}; expected {list(DATA_KEYS)}')
    if config is None:
        config = (getattr(model, 'snp_recipe', None) or {}).get('data_config') or data_config(model)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    config.update({k: v for k, v in overrides.items() if v is not None})
    return evaluate(model, folder_loader(root, config, batch_size, workers), progress=progress)
