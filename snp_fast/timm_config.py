"""How to rebuild a timm model's unpruned architecture (a recipe's timm name and kwargs), checked on the meta device."""
import json
from typing import Optional, Tuple

import torch.nn as nn

__all__ = ['infer_timm_config', 'resolve_timm_config', 'build_timm_skeleton']


def infer_timm_config(model: nn.Module, overrides: Optional[dict] = None) -> Tuple[Optional[str], dict, str]:
    """(timm name, kwargs, why-not) that rebuild `model`'s unpruned architecture with timm.create_model.

    The name comes from timm's pretrained_cfg; the kwargs are the ones the model was created with
    (timm records them as `_model_args`), then `overrides`. The result is checked on the meta device:
    the rebuilt model must have the same parameter names and shapes. When it cannot be rebuilt (not
    made by timm.create_model, kwargs that are not JSON, a mismatch), the name is None and the third
    item says why.
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    name = cfg.get('architecture')
    if name is None:
        return None, dict(overrides or {}), 'the model was not created by timm.create_model'
    kwargs = dict(getattr(model, '_model_args', None) or {})
    kwargs.update(overrides or {})
    kwargs.pop('pretrained', None)
    try:
        kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError):
        return None, {}, f'its timm kwargs are not JSON-serialisable: {sorted(kwargs)}'
    import timm

    def differs(kw: dict) -> str:
        try:
            skeleton = timm.create_model(name, pretrained=False, device='meta', **kw)
        except Exception as e:  # noqa: BLE001 -- any failure means these kwargs do not rebuild the model
            return f'timm.create_model({name!r}, **{kw}) failed: {e}'
        return _difference(model, skeleton, f'timm.create_model({name!r}, **{kw})')

    why = differs(kwargs)
    pool = getattr(model, 'global_pool', None)
    if why and isinstance(pool, str):
        # reset_classifier(global_pool=...) is not recorded in _model_args: say it, with the final norm it kept
        retry = dict(kwargs, global_pool=pool)
        if isinstance(getattr(model, 'fc_norm', None), nn.Module):
            retry['fc_norm'] = not isinstance(model.fc_norm, nn.Identity)
        if not differs(retry):
            return name, retry, ''
    return (None, kwargs, why) if why else (name, kwargs, '')


# Model attributes that change the forward pass without changing any parameter's name or shape.
_FORWARD_ATTRS = ('global_pool', 'num_prefix_tokens', 'has_class_token', 'no_embed_class', 'pool_include_prefix',
                  'dynamic_img_size')


def _difference(model: nn.Module, skeleton: nn.Module, built: str) -> str:
    """'' when `skeleton` has `model`'s parameter names and shapes, module types and forward attributes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if want != got:
        return f'{built} builds a different model (e.g. {sorted(set(want.items()) ^ set(got.items()))[:3]})'
    types = dict((n, type(m)) for n, m in skeleton.named_modules())
    for n, m in model.named_modules():
        if types.get(n) is not type(m):
            return (f'{built} builds {n or "the model"} as a {getattr(types.get(n), "__name__", None)}, '
                    f'not a {type(m).__name__}')
    for attr in _FORWARD_ATTRS:
        a, b = getattr(model, attr, None), getattr(skeleton, attr, None)
        if a != b:
            return f'{built} builds a model with {attr} = {b!r}, not {a!r}'
    return ''


def resolve_timm_config(model: nn.Module, timm_name: Optional[str], timm_kwargs: Optional[dict]):
    """(timm name, kwargs, why not inferable) that rebuild the unpruned architecture: inferred from the model
    unless given; kwargs inferred for a given name only when it is the model's own."""
    if timm_name is None:
        return infer_timm_config(model, timm_kwargs)
    if timm_kwargs is None:
        inferred_name, timm_kwargs, _ = infer_timm_config(model)
        if inferred_name != timm_name:
            timm_kwargs = {}
    return timm_name, timm_kwargs, ''


def build_timm_skeleton(recipe: dict) -> nn.Module:
    """timm.create_model(recipe's name, **kwargs) on the meta device; ValueError saying what is wrong."""
    import timm
    name, kwargs = recipe.get('timm_name'), recipe.get('timm_kwargs') or {}
    if not name:
        raise ValueError('the recipe has no timm_name: prune(..., timm_name=, timm_kwargs=) must say how to '
                         'build the unpruned model')
    try:
        return timm.create_model(name, pretrained=False, device='meta', **kwargs)
    except Exception as e:  # noqa: BLE001 -- any timm failure means the recipe does not describe a model
        raise ValueError(f'timm could not build {name!r} with {kwargs}: {e}') from e
