"""Model-family adapters. Each knows one family's structure and builds its coupled groups."""
from . import vit
from .vit import (BlockDims, BlockSelection, ModelDims, PrunedAttention, Selection, UnsupportedModelError,
                  SUPPORTED)

__all__ = ['vit', 'BlockDims', 'BlockSelection', 'ModelDims', 'PrunedAttention', 'Selection',
           'UnsupportedModelError', 'SUPPORTED']
