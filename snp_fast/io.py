"""Saving and loading pruned models without pickle: safetensors weights + a readable JSON recipe.

    DIR/model.safetensors   the pruned model's state dict
    DIR/recipe.json         timm name + kwargs of the unpruned architecture, widths before/after, the
                            kept indices of every group, and the settings prune() used

load_pruned() builds the unpruned architecture with timm on the meta device (no memory, no init),
applies the recipe's widths, and loads the weights with every name and shape checked.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, Optional

import torch
import torch.nn as nn

from .families import family_for_recipe
from .report import RECIPE_FORMAT

__all__ = ['save_pruned', 'load_pruned', 'RecipeError']

WEIGHTS = 'model.safetensors'
RECIPE = 'recipe.json'


class RecipeError(ValueError):
    """A saved pruned model whose recipe or weights are missing, malformed or inconsistent."""


def _build_skeleton(recipe: dict) -> nn.Module:
    """The unpruned architecture of a recipe, on the meta device, by the recipe's family."""
    family = family_for_recipe(recipe)
    try:
        model = family.build_unpruned(recipe)
    except ValueError as e:
        raise RecipeError(str(e)) from e
    except Exception as e:  # noqa: BLE001 -- any failure to build means the recipe does not describe a model
        raise RecipeError(f'the recipe\'s model could not be built: {e}') from e
    family.check_supported(model)
    return model


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only set it)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it and a rename: never half-written."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.snp_fast_', dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pruned(model: nn.Module, directory: str, overwrite: bool = False, report=None,
                files: Optional[Dict[str, bytes]] = None) -> str:
    """Write a model returned by snp_fast.prune() to `directory` (weights + recipe [+ report.json] [+ `files`,
    name -> bytes, e.g. a plot]).

    The directory is written next to its destination and renamed into place, so a failure leaves
    nothing half-written. An existing non-empty directory is an error unless overwrite=True.
    """
    from safetensors.torch import save_file
    recipe = getattr(model, 'snp_recipe', None)
    if not isinstance(recipe, dict):
        raise ValueError('save_pruned needs a model returned by snp_fast.prune() (it carries the recipe)')
    problem = family_for_recipe(recipe).rebuild_problem(recipe)
    if problem:
        raise ValueError(problem)
    directory = os.path.realpath(directory)  # a link to a folder: that folder is replaced, the link stays
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f'{directory} exists and is not a directory')
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f'{directory} exists and is not empty (pass overwrite=True to replace it)')
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.snp_fast_', dir=parent)
    old = None
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, WEIGHTS),
                  metadata={'format': recipe['format'], 'structure': structure_digest(recipe)})
        with open(os.path.join(tmp, RECIPE), 'w') as f:
            json.dump(recipe, f, indent=1)
        if report is not None:
            with open(os.path.join(tmp, 'report.json'), 'w') as f:
                json.dump(report.to_dict(), f, indent=1, default=str)
        for name, data in (files or {}).items():
            if os.path.basename(name) != name or name in (WEIGHTS, RECIPE, 'report.json'):
                raise ValueError(f'save_pruned: extra file name {name!r} must be a plain name other than the model files')
            with open(os.path.join(tmp, name), 'wb') as f:
                f.write(data)
        # mkdtemp's 0700 (and safetensors' 0600 files) would hide the saved model from other users
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        if os.path.exists(directory):  # keep the old directory until the new one is in place
            old = tempfile.mkdtemp(prefix='.snp_fast_old_', dir=parent)
            os.replace(directory, os.path.join(old, 'd'))
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:  # the new one did not land: the previous save goes back where it was
            if os.path.exists(os.path.join(old, 'd')) and not os.path.exists(directory):
                os.replace(os.path.join(old, 'd'), directory)
            shutil.rmtree(old, ignore_errors=True)
        raise
    return directory


def structure_digest(recipe: dict) -> str:
    """A hash of the pruned structure (widths before and after, kept indices), written into the weights file's
    metadata: a recipe.json from another save is caught on load even where the tensor shapes agree (e.g. 3
    heads of 32 dims against 2 heads of 48). The timm kwargs stay editable (e.g. dynamic_img_size)."""
    import hashlib
    keys = ('family', 'dims_before', 'dims_after', 'selection')
    text = json.dumps({k: recipe.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_format_json(path: str, fmt: str, what: str, error: type) -> dict:
    """A JSON object whose 'format' must be `fmt` (snp_fast's recipes and checkpoints); `error` otherwise."""
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f'{path} is not valid JSON: {e}') from e
    if not isinstance(obj, dict) or obj.get('format') != fmt:
        raise error(f'{path}: unknown {what} format {obj.get("format") if isinstance(obj, dict) else None!r}'
                    f' (expected {fmt!r})')
    return obj


def load_recipe(directory: str) -> dict:
    path = os.path.join(directory, RECIPE)
    if not os.path.isfile(path):
        raise RecipeError(f'{path} not found: {directory} is not a directory written by snp_fast.save_pruned')
    recipe = read_format_json(path, RECIPE_FORMAT, 'recipe', RecipeError)
    for key in ('dims_before', 'dims_after', 'selection'):
        if key not in recipe:
            raise RecipeError(f'{path}: missing {key!r}')
    return recipe


def _init_computed_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers (RoPE tables, EvaAttention's zero k_bias) are not in the weights file: timm
    recomputes them from each module's configuration (init_non_persistent_buffers), in float32; in a model
    saved in another float dtype their modules are then moved to it, as model.to(dtype) had done before the
    save (by the module's own rules: timm's RoPE keeps its periods in float32)."""
    computed = []
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        mod_name, _, leaf = name.rpartition('.')
        mod = model.get_submodule(mod_name) if mod_name else model
        if not hasattr(mod, 'init_non_persistent_buffers'):
            raise RecipeError(f'buffer {name} is not saved and {type(mod).__name__} cannot recompute it')
        mod._buffers[leaf] = torch.empty_like(buf, device=device)
        computed.append(mod)
    for mod in model.modules():
        if hasattr(mod, 'init_non_persistent_buffers') and any(True for _ in mod.buffers(recurse=False)):
            mod.init_non_persistent_buffers()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        for mod in computed:
            mod.to(dtype)


def load_pruned(directory: str, device='cpu') -> nn.Module:
    """Rebuild a model saved by save_pruned() (no pickle; every tensor name and shape is checked)."""
    from safetensors import SafetensorError, safe_open
    recipe = load_recipe(directory)
    wpath = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(wpath):
        raise RecipeError(f'{wpath} not found')
    try:
        family = family_for_recipe(recipe)
    except ValueError as e:
        raise RecipeError(f'{directory}/{RECIPE}: {e}') from None
    model = _build_skeleton(recipe)
    try:
        dims = family.dims_type
        before, after = dims.from_dict(recipe['dims_before']), dims.from_dict(recipe['dims_after'])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f'{directory}/{RECIPE}: malformed dims: {e}') from e
    built = family.model_dims(model)
    if built != before:
        raise RecipeError(f'{directory}/{RECIPE}: timm built {recipe["timm_name"]} with widths {built.to_dict()} '
                          f'but the recipe was pruned from {before.to_dict()}')
    try:
        family.apply_dims(model, after)
    except ValueError as e:
        raise RecipeError(f'{directory}/{RECIPE}: {e}') from e
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    try:
        with safe_open(wpath, framework='pt', device=str(device)) as f:
            saved = (f.metadata() or {}).get('structure')  # (absent in files written before it was recorded)
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise RecipeError(f'{wpath} does not match its recipe: missing {missing[:5]}, '
                                  f'unexpected {unexpected[:5]}')
            for k in expected:
                t = f.get_tensor(k)
                if tuple(t.shape) != expected[k]:
                    raise RecipeError(f'{wpath}: {k} has shape {tuple(t.shape)} but the recipe gives {expected[k]}')
                state[k] = t
    except SafetensorError as e:  # a truncated or corrupt file
        raise RecipeError(f'{wpath} is not a readable safetensors file: {e}') from e
    if saved is not None and saved != structure_digest(recipe):  # the shapes agree, yet the structure differs
        raise RecipeError(f'{wpath} was not saved with {directory}/{RECIPE}: the recipe describes another '
                          'pruned structure (widths or kept indices)')
    model.load_state_dict(state, strict=True, assign=True)
    _init_computed_buffers(model, device)
    model.snp_recipe = recipe
    return model.eval()
