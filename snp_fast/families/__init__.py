"""Model families: one folder each, every one implementing families.base.Family and registering itself.

    vit/              timm VisionTransformer, VisionTransformerRelPos, Eva
    efficientformer/  timm EfficientFormer V1
    hf_vit/           Hugging Face transformers ViT, DeiT, DINOv2
    swin/             timm Swin Transformer (V1)

Adding a family is adding its folder and importing it below.
"""
from .base import Family, Step, UnsupportedModelError
from .registry import families, family_for_recipe, family_named, family_of, register_family

from . import vit  # noqa: E402,F401  (each registers itself)
from . import efficientformer  # noqa: E402,F401
from . import hf_vit  # noqa: E402,F401
from . import swin  # noqa: E402,F401

__all__ = ['Family', 'Step', 'UnsupportedModelError', 'families', 'family_of', 'family_named', 'family_for_recipe',
           'register_family', 'vit', 'efficientformer', 'hf_vit', 'swin']
