"""The SNP authors' per-block pruning ratios (fraction removed), shipped as named presets.

    deit_tiny_patch16_224         0.6 GMACs  (0.638 with per-head rounding)
    deit_small_patch16_224        2.0 GMACs  (2.037)
    deit_small_patch16_224_1p3G   1.3 GMACs  (1.265)
    deit_base_patch16_224         6.4 GMACs  (6.322; SNP alone)

and one of ours (not the authors' numbers, which are not published; derivation in the file's "search"):

    deit_base_patch16_224_snp_head_3p5G   3.5 GMACs (3.503; SNP + Head: half the heads removed, then
                                          snp_fast.allocate's rule bisected to the target)

and for EfficientFormer (uniform ratios in the {'qk', 'v', 'mlp', 'embed'} form, 'family': 'efficientformer';
models/efficientformer.resolve_ratios reads them):

    efficientformer_l1_0p6G       0.6 GMACs  (0.599; ratio 0.325)
    efficientformer_l1_0p5G       0.5 GMACs  (0.497; ratio 0.3875)
"""
import json
from importlib import resources
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # (torch and timm are imported when a preset's model is built, not with the presets)
    import torch

__all__ = ['list_presets', 'load_preset', 'preset_model', 'INFO_KEYS']

# what a preset says besides its ratios: ignored by the ratio parsers, which refuse any other unknown key (a typo
# of 'embed' or 'drop_mlp' must not pass for a description)
INFO_KEYS = frozenset({'model', 'family', 'note', 'search', 'gmacs', 'target_gmacs', 'params_m', 'paper_gflops',
                       'paper_top1', 'paper_top1_after_finetune'})


def list_presets() -> List[str]:
    files = resources.files('snp_fast').joinpath('presets')
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith('.json'))


def load_preset(name: str) -> dict:
    """A preset as {'model', 'blocks': [{'qk', 'v', 'mlp'}], 'embed', ...}."""
    if name not in list_presets():
        raise ValueError(f'unknown preset {name!r}; available: {list_presets()}')
    with resources.files('snp_fast').joinpath('presets', f'{name}.json').open() as f:
        return json.load(f)


def preset_model(preset: dict) -> Optional['torch.nn.Module']:
    """The model a preset was chosen for (its 'model'), built on the meta device (no memory, no weights), to
    compare widths with; None where this timm cannot build it (nothing to compare with)."""
    import timm
    import torch
    try:
        with torch.device('meta'):
            return timm.create_model(preset['model'])
    except Exception:  # noqa: BLE001
        return None
