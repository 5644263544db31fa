"""The ViT family's presets (its ratio forms are shared with other uniform stacks: families/uniform.py)."""
from typing import Optional

from ...presets import list_presets, load_preset, preset_model
from ..uniform import DROP_KEYS, RATIO_KEYS, ModelDims, resolve_ratios, target_dims
from .structure import model_dims

__all__ = ['resolve_ratios', 'target_dims', 'preset_mismatch', 'DROP_KEYS', 'RATIO_KEYS']


def preset_mismatch(name: str, dims: ModelDims) -> Optional[str]:
    """A preset's ratios were chosen for one architecture (its 'model'). Another family's preset, or one for
    another depth, is refused (ValueError); on other widths its ratios still apply but the MACs it quotes do
    not: that is returned, to be warned about (None: the preset's own widths, or an unknown name)."""
    if name not in list_presets():
        return None  # (resolve_ratios names the available ones)
    p = load_preset(name)
    if p.get('family', 'vit') != 'vit':
        raise ValueError(f"preset {name!r} is for {p.get('model')}, not a ViT (the {p['family']} family)")
    made_for = preset_model(p)
    if made_for is None:
        return None
    want = model_dims(made_for)
    if len(want.blocks) != len(dims.blocks):
        raise ValueError(f"preset {name!r} is for {p['model']} ({len(want.blocks)} blocks); this model has "
                         f'{len(dims.blocks)}')
    if want == dims:
        return None
    return (f"preset {name!r} was chosen for {p['model']} (embedding {want.embed}, fc1 {want.blocks[0].mlp}); "
            f"this model's widths differ (embedding {dims.embed}, fc1 {dims.blocks[0].mlp}): the ratios apply, "
            'the MACs the preset quotes do not')
