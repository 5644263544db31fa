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

__all__ = ['WeightsError', 'create_model', 'load_state', 'load_checkpoint', 'hub_reachable']

_WRAPPER_KEYS = ('model', 'state_dict', 'model_state', 'module')


class WeightsError(ValueError):
    """A model that timm cannot build, or a weights file that cannot be read or does not fit the model.

    Attributes:
        arg: which input is at fault: 'model' (the timm name), 'kwargs' (the timm keyword arguments),
            'pretrained' (the hub weights) or 'file' (the weights file; the message then starts with its path).
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
    """Load the weights in `path` (see load_state) into `model`, every name and shape checked.

    Keys in the original DeiT/ViT naming are converted with timm's checkpoint_filter_fn.

    Raises:
        WeightsError: the file cannot be read or does not match the model.
    """
    sd = load_state(path)
    try:
        model.load_state_dict(sd, strict=True)
        return
    except RuntimeError as e:
        first = e
    try:  # timm's own conversion (pos_embed resizing, original DeiT/ViT key names)
        from timm.models.vision_transformer import checkpoint_filter_fn
        model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
        return
    except Exception:  # noqa: BLE001 -- report the plain mismatch below
        pass
    msg = str(first).replace('\n\t', ' ').replace('\n', ' ')
    raise WeightsError(f'{path} does not match {type(model).__name__} '
                       f'{getattr(model, "pretrained_cfg", {}).get("architecture", "")}: {msg[:800]}')
