"""The family registry: which family a model or a recipe belongs to.

A family registers itself when its package is imported (snp_fast/families/__init__.py imports them all);
adding a family is adding its folder and one import there."""
from typing import Dict, List

import torch.nn as nn

from .base import Family, UnsupportedModelError

__all__ = ['register_family', 'family_of', 'family_named', 'family_for_recipe', 'families']

_FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f'a model family named {family.name!r} is already registered')
    _FAMILIES[family.name] = family
    return family


def families() -> List[Family]:
    return list(_FAMILIES.values())


def family_of(model: nn.Module) -> Family:
    """The family whose model type `model` is; UnsupportedModelError listing what is supported otherwise."""
    for f in _FAMILIES.values():
        if f.claims(model):
            return f
    raise UnsupportedModelError(f'{type(model).__name__} is not supported; snp_fast prunes '
                                + '; '.join(f.supported for f in _FAMILIES.values()))


def family_named(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f'unknown model family {name!r}; known: {sorted(_FAMILIES)}') from None


def family_for_recipe(recipe: dict) -> Family:
    """The family that rebuilds a recipe's architecture (recipes before families were recorded: 'vit')."""
    return family_named(recipe.get('family') or 'vit')
