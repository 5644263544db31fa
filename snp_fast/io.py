"""Saving and loading pruned models without pickle: safetensors weights + a readable JSON recipe.

    DIR/model.safetensors   the pruned model's state dict
    DIR/recipe.json         timm name + kwargs of the unpruned architecture, widths before/after, the
                            kept indices of every group, and the settings prune() used

load_pruned() builds the unpruned architecture with timm on the meta device (no memory, no init),
applies the recipe's widths, and loads the weights with every name and shape checked.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from typing import Dict, Optional

import torch
import torch.nn as nn

from .families import family_for_recipe
from .outputs import MODEL_FILES, current_umask, plan_dir
from .report import RECIPE_FORMAT

__all__ = ['save_pruned', 'load_pruned', 'check_recipe_safe', 'RecipeError']

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


# Temporary folders of save_pruned, beside the destination: .snp_fast_<new|old>-<pid>-<host hash>-<random>.
# An "old" one holds the previous save ('d') while the new one is renamed into place, and a file naming the
# destination. A process killed mid-save (SIGKILL, power cut) leaves them behind; the next save into the same
# parent folder removes those that are stale (clean_stale_temp).
TMP_PREFIX = '.snp_fast_'
STALE_AGE_S = 24 * 3600       # a temp folder this old is stale whoever made it (no save takes a day)
_TARGET = 'target'
_TMP_NAME = re.compile(r'\.snp_fast_(new|old)-(\d+)-([0-9a-f]{8})-')
_LEGACY_NAME = re.compile(r'\.snp_fast_(old_)?[a-z0-9_]{8}')   # mkdtemp names of snp_fast before 0.x: age only


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _mkdtemp(parent: str, kind: str) -> str:
    return tempfile.mkdtemp(prefix=f'{TMP_PREFIX}{kind}-{os.getpid()}-{_host()}-', dir=parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # another user's process (or not a pid we can ask about): assume alive
    return True


def clean_stale_temp(parent: str, now: Optional[float] = None) -> list:
    """Remove the temporary folders that an interrupted save_pruned left in `parent`; returns what it removed.

    Only directories (not links, not files) whose name is one snp_fast's save gives its temp folders
    (_TMP_NAME, or the older plain mkdtemp names .snp_fast_XXXXXXXX / .snp_fast_old_XXXXXXXX), owned by this
    user, and stale: made on this host by a process that is gone, or last modified more than STALE_AGE_S ago
    (any host: a shared file system). A stale "old" folder whose destination is missing holds the only copy of
    the previous save: it is put back there instead of removed (an older-style one, which does not say where
    it belongs, is left alone). Errors are ignored: cleaning never fails a save."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if not (m or _LEGACY_NAME.fullmatch(name)):
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        dead = m is not None and m.group(3) == _host() and not _pid_alive(int(m.group(2)))
        if not (dead or now - st.st_mtime > STALE_AGE_S):
            continue
        kept = os.path.join(path, 'd')
        if os.path.isdir(kept):
            try:
                with open(os.path.join(path, _TARGET)) as f:
                    target = f.read().strip()
            except OSError:
                continue   # a previous save of unknown destination: not ours to delete
            dest = os.path.join(parent, target)
            if os.path.basename(target) != target or target in ('', '.', '..'):
                continue
            if not os.path.lexists(dest):
                try:
                    os.replace(kept, dest)
                except OSError:
                    continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            removed.append(name)
    return removed


def save_pruned(model: nn.Module, directory: str, overwrite: bool = False, report=None,
                files: Optional[Dict[str, bytes]] = None) -> str:
    """Write a model returned by snp_fast.prune() to `directory` (weights + recipe [+ report.json] [+ `files`,
    name -> bytes, e.g. a plot]).

    The directory is written next to its destination and renamed into place, so a failure leaves
    nothing half-written. An existing non-empty directory is an error unless overwrite=True. Weights with NaN/Inf
    and a recipe that check_recipe_safe refuses are not written (ValueError / RecipeError). Temporary folders
    that an earlier, killed save left in the same parent folder are removed first (clean_stale_temp).
    """
    from safetensors.torch import save_file
    recipe = getattr(model, 'snp_recipe', None)
    if not isinstance(recipe, dict):
        raise ValueError('save_pruned needs a model returned by snp_fast.prune() (it carries the recipe)')
    problem = family_for_recipe(recipe).rebuild_problem(recipe)
    if problem:
        raise ValueError(problem)
    check_recipe_safe(recipe, 'save_pruned: the recipe')  # what load_pruned would refuse is not written
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f'save_pruned: {k} holds NaN/Inf values; a model with non-finite weights is not written')
    directory = os.path.realpath(directory)  # a link to a folder: that folder is replaced, the link stays
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f'{directory} exists and is not a directory')
    if os.path.exists(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(f'{directory} exists and is not empty (pass overwrite=True to replace it)')
    if overwrite:  # the one output rule (outputs.py): never a folder holding anything but a model, nor the cwd
        plan_dir(directory, 'directory', overwrite=True,
                 replaceable=set(MODEL_FILES) | {os.path.basename(n) for n in (files or {})})
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    clean_stale_temp(parent)
    tmp = _mkdtemp(parent, 'new')
    old = None
    try:
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
        mask = current_umask()
        os.chmod(tmp, 0o777 & ~mask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        if os.path.exists(directory):  # keep the old directory until the new one is in place
            old = _mkdtemp(parent, 'old')
            with open(os.path.join(old, _TARGET), 'w') as f:  # where 'd' belongs, should this process die
                f.write(os.path.basename(directory))
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


# timm.create_model / build_model_with_cfg arguments that load weights or configs (files, the hub, URLs) or
# rebuild the model from a file: a recipe is data, so none of them may come from it.
_LOADING_KWARGS = frozenset({
    'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir', 'pretrained_strict',
    'pretrained_filter_fn', 'pretrained_model_args', 'kwargs_filter', 'pruned', 'features_only', 'feature_cls',
    'feature_cfg', 'model_cfg', 'device', 'dtype'})
# a plain timm registry name, optionally with a pretrained tag ('deit_small_patch16_224.fb_in1k'): no source
# prefix (hf-hub:, local-dir:), no URL, no path
_TIMM_NAME = re.compile(r'[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?')
_LOCATION = re.compile(r'://|^(hf-hub|local-dir|file|https?):|[/\\]|^~')


def check_recipe_safe(recipe: dict, where: str = 'recipe') -> None:
    """Refuse (RecipeError) a recipe whose timm_name / timm_kwargs would make timm reach the network or read a
    file: building its model must only ever run timm's registered code on the meta device.

    timm_name must be a registered timm model name (optionally with a '.tag'); timm_kwargs must be a JSON object
    with none of the loading arguments of timm.create_model / build_model_with_cfg (pretrained,
    pretrained_cfg[_overlay], checkpoint_path, cache_dir, pruned, ...; see _LOADING_KWARGS) and no string,
    at any depth, that names a location (a URL, an hf-hub:/local-dir: source, a path)."""
    name, kwargs = recipe.get('timm_name'), recipe.get('timm_kwargs')
    if name is not None:
        if not isinstance(name, str) or not _TIMM_NAME.fullmatch(name):
            raise RecipeError(f'{where}: timm_name {name!r} is not a plain timm model name (a recipe may not name '
                              'a hub, a URL or a path: loading it must not reach the network or read other files)')
        import timm
        if not timm.is_model(name.split('.')[0]):
            raise RecipeError(f'{where}: timm_name {name!r} is not a model this timm ({timm.__version__}) knows')
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise RecipeError(f'{where}: timm_kwargs must be a JSON object, got {type(kwargs).__name__}')
    bad = sorted(k for k in kwargs if k in _LOADING_KWARGS)
    if bad:
        raise RecipeError(f'{where}: timm_kwargs {bad} would make timm load weights or configs; a recipe may only '
                          'give architecture arguments')

    def scan(value, path):
        if isinstance(value, str) and _LOCATION.search(value):
            raise RecipeError(f'{where}: timm_kwargs {path} = {value!r} names a location (URL, hub or path); '
                              'a recipe may only give architecture arguments')
        if isinstance(value, dict):
            for k, v in value.items():
                scan(k, path)
                scan(v, f'{path}.{k}')
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                scan(v, f'{path}[{i}]')
    for key, value in kwargs.items():
        scan(key, key)
        scan(value, key)


def load_recipe(directory: str) -> dict:
    """The recipe.json of a folder written by save_pruned, checked to be safe to build (check_recipe_safe)."""
    path = os.path.join(directory, RECIPE)
    if not os.path.isfile(path):
        raise RecipeError(f'{path} not found: {directory} is not a directory written by snp_fast.save_pruned')
    recipe = read_format_json(path, RECIPE_FORMAT, 'recipe', RecipeError)
    for key in ('dims_before', 'dims_after', 'selection'):
        if key not in recipe:
            raise RecipeError(f'{path}: missing {key!r}')
    check_recipe_safe(recipe, path)
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


def _check_device(device) -> None:
    """ValueError for a device the weights cannot be loaded onto (before anything is read)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f'load_pruned: device {device!r} is not a torch device: {e}') from e
    if dev.type == 'meta':
        raise ValueError('load_pruned: the meta device holds no data; load the weights on cpu or cuda')
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'load_pruned: device {device!r}: CUDA is not available on this machine')
        if (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f'load_pruned: device {device!r}: this machine has {torch.cuda.device_count()} CUDA '
                             'device(s)')


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_weights(state: Dict[str, torch.Tensor], dtypes: Dict[str, torch.dtype], wpath: str) -> None:
    """RecipeError unless the weights are usable as they are: every floating tensor of the model holds finite
    values and all of them share one float dtype (float16, bfloat16, float32 or float64: the dtype the model
    was saved in); integer and bool buffers keep the dtype the model gives them."""
    floats = {}
    for k, t in state.items():
        want = dtypes[k]
        if want.is_floating_point:
            if t.dtype not in _FLOAT_DTYPES:
                raise RecipeError(f'{wpath}: {k} is {t.dtype}, but the model needs a floating tensor there '
                                  f'(one of {", ".join(str(d) for d in _FLOAT_DTYPES)})')
            floats.setdefault(t.dtype, []).append(k)
        elif t.dtype != want:
            raise RecipeError(f'{wpath}: {k} is {t.dtype}, but the model\'s {k} is {want}')
    if len(floats) > 1:  # the dtype most tensors have is the model's; the others are named
        main = max(floats, key=lambda d: len(floats[d]))
        odd = sorted((k, d) for d, ks in floats.items() if d != main for k in ks)
        raise RecipeError(f'{wpath}: mixed float dtypes: {odd[0][0]} is {odd[0][1]} but the model\'s other '
                          f'floating tensors are {main} ({len(odd)} tensor{"s" if len(odd) > 1 else ""} differ: '
                          f'{[k for k, _ in odd[:5]]})')
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise RecipeError(f'{wpath}: {k} holds {n} NaN/Inf value{"s" if n > 1 else ""}: the weights are broken')


def load_pruned(directory: str, device='cpu') -> nn.Module:
    """Rebuild a model saved by save_pruned() (no pickle; every tensor name and shape is checked)."""
    from safetensors import SafetensorError, safe_open
    _check_device(device)
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
    skeleton_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in skeleton_state.items()}
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
    _check_weights(state, {k: v.dtype for k, v in skeleton_state.items()}, wpath)
    model.load_state_dict(state, strict=True, assign=True)
    _init_computed_buffers(model, device)
    model.snp_recipe = recipe
    return model.eval()
