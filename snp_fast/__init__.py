"""snp_fast: SNP (Structured Neuron-level Pruning, Shim et al., ECCV 2024) for timm vision transformers.

    pruned, report = snp_fast.prune(model, calib_images, ratios=0.5)          # or preset='deit_small_patch16_224'
    snp_fast.save_pruned(pruned, 'out/deit_s_snp')                            # safetensors + recipe.json
    model = snp_fast.load_pruned('out/deit_s_snp')

Query/key filters are ranked by how much they preserve the top singular components of QKᵀ on
calibration images, value and FFN filters by redundancy, residual-stream channels as one coupled
group; every pruned Linear is then re-fit by least squares to the original model's outputs
(docs/METHOD.md).
"""
from .version import __version__
from .families import UnsupportedModelError, family_of
from .families.vit import PrunedAttention
from .io import RecipeError, load_pruned, save_pruned
from .macs import count_macs, count_params
from .pipeline import prune
from .presets import list_presets, load_preset
from .report import PruneReport
from .selection import Group, Selector

__all__ = ['prune', 'PruneReport', 'save_pruned', 'load_pruned', 'RecipeError', 'count_macs', 'count_params',
           'list_presets', 'load_preset', 'PrunedAttention', 'UnsupportedModelError', 'Selector', 'Group',
           'family_of', '__version__']
