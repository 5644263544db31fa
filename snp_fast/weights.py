"""Building a timm model and loading its (unpruned) weights: what `snp-fast prune --checkpoint / --pretrained`
and `finetune --teacher-weights` do, as a library.

    model = snp_fast.weights.create_model('deit_small_patch16_224', device='cpu')
    snp_fast.weights.load_checkpoint(model, 'deit_s.pth')      # .safetensors or a torch state dict

Every failure is a WeightsError (a ValueError) whose message names the file or the model at fault; its
`arg` says which input it is about ('model', 'kwargs', 'pretrained' or 'file'), so that a command line can
name its own flag. Files are read without pickle code execution (`torch.load(weights_only=True)`).
"""
import os
from typing import Dict, Optional

import torch
import torch.nn as nn

__all__ = ['WeightsError', 'create_model', 'check_forward', 'load_state', 'load_checkpoint', 'hub_reachable']

_WRAPPER_KEYS = ('model', 'state_dict', 'model_state', 'module')
# checkpoint dtypes a floating-point parameter may be loaded from (converted as load_state_dict does)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class WeightsError(ValueError):
    """A model that timm cannot build, or a weights file that cannot be read or does not fit the model.

    Attributes:
        arg: which input is at fault: 'model' (the timm name), 'kwargs' (the timm keyword arguments), 'size'
            (the model cannot run at its input size), 'pretrained' (the hub weights) or 'file' (the weights file;
            the message then starts with its path).
        detail: the underlying reason alone (what timm or the reader said), '' when the message is all.
    """

    def __init__(self, message: str, arg: str = 'file', detail: str = ''):
        super().__init__(message)
        self.arg, self.detail = arg, detail


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on port 443 within `timeout` seconds."""
    import socket
    try:
        socket.create_connection(('huggingface.co', 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_model(name: str, kwargs: Optional[dict] = None, *, pretrained: bool = False,
                 device='meta') -> nn.Module:
    """`timm.create_model(name, **kwargs)` with clean errors.

    Args:
        name: a timm model name (a path, or a name timm does not know, is refused with similar names).
        kwargs: extra timm.create_model keyword arguments (e.g. {'img_size': 384}).
        pretrained: download (or take from the local cache) the hub weights. Offline (HF_HUB_OFFLINE set, or
            huggingface.co unreachable) the local cache is used without retries, or it fails at once.
        device: where the parameters are made ('meta': no memory, no initialisation). Ignored with pretrained.

    Raises:
        WeightsError: arg 'model' (not a timm name), 'kwargs' (timm refuses the kwargs) or 'pretrained'.
    """
    import timm
    kwargs = dict(kwargs or {})
    if not timm.is_model(name) and (os.path.sep in name or os.path.exists(name)):
        raise WeightsError(f'{name!r} is a path, not a timm model name', 'model')
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise WeightsError(f'{name!r} is not a timm model name' + (f' (similar: {", ".join(close)})' if close else ''),
                           'model')
    if pretrained:
        return _create_pretrained(name, kwargs)
    try:
        return timm.create_model(name, pretrained=False, device=device, **kwargs)
    except Exception as e:  # noqa: BLE001 -- whatever timm raises for these kwargs (ZeroDivisionError included)
        why = f'{type(e).__name__}: {e}'
        raise WeightsError(f'timm cannot build {name!r} with kwargs {kwargs}: {why}', 'kwargs', why) from None


def check_forward(model: nn.Module, input_size=None) -> None:
    """Run `model` once on the meta device (no memory, no compute) at its own input size: a model that timm
    builds but that cannot run at that size (e.g. img_size smaller than the patch) fails here, not mid-work.

    Raises:
        WeightsError: arg 'size', with what the forward pass said.
    """
    from .calib import data_config
    from .macs import meta_copy
    size = tuple(input_size or data_config(model)['input_size'])
    m = model if all(p.is_meta for p in model.parameters()) else meta_copy(model)
    dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            m.eval()(torch.empty(1, *size, device='meta', dtype=dtype))
    except Exception as e:  # noqa: BLE001 -- whatever the layers raise for this size
        why = f'{type(e).__name__}: {e}'
        raise WeightsError(f'{_arch(model)} cannot run on its input size {size}: {why}', 'size', why) from None


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    import timm
    offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0', 'false', 'False') or not hub_reachable()
    hc = saved = None
    saved_env = os.environ.get('HF_HUB_OFFLINE')
    if offline:  # no retries against an unreachable hub: use the local cache or fail at once
        try:
            import huggingface_hub.constants as hc
            saved, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
        except ImportError:
            pass
        os.environ['HF_HUB_OFFLINE'] = '1'
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 -- hub, cache and network errors come in many types
        why = ('huggingface.co cannot be reached (offline?) and the weights are not in the local cache'
               if offline else f'{type(e).__name__}: {e}')
        raise WeightsError(f'cannot get pretrained weights for {name!r}: {why}. Download them where there is '
                           'internet and load them from a file instead.', 'pretrained') from None
    finally:
        if offline:
            if hc is not None:
                hc.HF_HUB_OFFLINE = saved
            if saved_env is None:
                os.environ.pop('HF_HUB_OFFLINE', None)
            else:
                os.environ['HF_HUB_OFFLINE'] = saved_env


def load_state(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in `path`: a .safetensors file, or a torch checkpoint read with weights_only=True.

    A dict wrapping the weights under 'model', 'state_dict', 'model_state' or 'module' is unwrapped, and a
    'module.' prefix on every key (DistributedDataParallel) is dropped.

    Raises:
        WeightsError: the file is missing, unreadable, or does not hold a dict of tensors.
    """
    if not os.path.exists(path):
        raise WeightsError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise WeightsError(f'{path}: not a file')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- corrupt files raise anything from pickle/zip/safetensors
        kind = 'a safetensors file' if path.endswith('.safetensors') else 'a torch state dict (weights_only=True)'
        raise WeightsError(f'{path}: cannot be read as {kind}: {type(e).__name__}: {e}') from None
    if isinstance(sd, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f'{path}: does not hold a state dict of tensors')
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load the weights in `path` (see load_state) into `model`, every name, shape and dtype checked.

    Keys in the original DeiT/ViT naming are converted with timm's checkpoint_filter_fn, but a tensor that
    conversion would resample (patch_embed of another patch size, pos_embed of another image size) is refused:
    those weights belong to another model, pass its img_size / patch_size instead. Floating-point weights must
    be finite and float32, float16 or bfloat16; integer buffers must have the model's dtype.

    Raises:
        WeightsError: the file cannot be read or does not match the model; the message names the tensor.
    """
    sd = load_state(path)
    target = model.state_dict()
    _check_values(sd, target, path)
    try:
        model.load_state_dict(sd, strict=True)
        return
    except RuntimeError as e:
        first = e
    try:  # timm's own conversion (original DeiT/ViT key names)
        from timm.models.vision_transformer import checkpoint_filter_fn
        converted = checkpoint_filter_fn(sd, model)
    except Exception:  # noqa: BLE001 -- report the plain mismatch below
        converted = None
    if converted is not None:
        resampled = [k for k, v in converted.items() if k in sd and _resampled(sd[k], v)]
        if resampled:
            shapes = ', '.join(f'{k} {tuple(sd[k].shape)} -> {tuple(converted[k].shape)}' for k in resampled[:3])
            raise WeightsError(f'{path}: holds weights of another patch size or image size than {_arch(model)} '
                               f'({shapes}); they are not resampled: build the model they belong to (its img_size / '
                               'patch_size)')
        try:
            _check_values(converted, target, path)
            model.load_state_dict(converted, strict=True)
            return
        except (RuntimeError, WeightsError):
            pass
    msg = str(first).replace('\n\t', ' ').replace('\n', ' ')
    raise WeightsError(f'{path} does not match {_arch(model)}: {msg[:800]}')


def _resampled(saved: torch.Tensor, converted: torch.Tensor) -> bool:
    """Whether timm's conversion changed a tensor's values, not only its layout (a reshape keeps the count)."""
    return saved.shape != converted.shape and (saved.numel() != converted.numel() or saved.dim() == converted.dim())


def _arch(model: nn.Module) -> str:
    return f'{type(model).__name__} {getattr(model, "pretrained_cfg", {}).get("architecture", "")}'.strip()


def _check_values(sd: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor], path: str) -> None:
    """Every tensor of `sd` that `target` has: a dtype it can be loaded from, and finite values."""
    for k, v in sd.items():
        want = target.get(k)
        if want is None:
            continue
        if want.is_floating_point():
            if v.dtype not in _FLOAT_DTYPES:
                raise WeightsError(f'{path}: {k} is {str(v.dtype).replace("torch.", "")}; weights must be float32, '
                                   'float16 or bfloat16' + (' (convert the file to float32)'
                                                            if v.is_floating_point() else ''))
            if not bool(torch.isfinite(v).all()):
                bad = int((~torch.isfinite(v)).sum())
                raise WeightsError(f'{path}: {k} holds {bad} NaN or Inf value{"s" if bad > 1 else ""}')
        elif v.dtype != want.dtype:
            raise WeightsError(f'{path}: {k} is {str(v.dtype).replace("torch.", "")}, the model\'s '
                               f'{str(want.dtype).replace("torch.", "")}')
