"""ONNX export of (pruned) models, checked with ONNX Runtime.

Uses torch.onnx.export's TorchScript exporter (dynamo=False): the dynamo exporter needs the onnxscript
package, which is not a dependency and cannot be installed offline. Opset 17 by default (LayerNorm is a
native op from 17 on); the batch dimension is dynamic. PrunedAttention's scaled_dot_product_attention
call, with its explicit (original) scale, exports as MatMul/Softmax/MatMul.

The file is written next to its destination and renamed into place, so a failed export leaves nothing.
"""
import contextlib
import io
import os
import tempfile
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .macs import example_input, model_input_size
from .outputs import current_umask

__all__ = ['DEFAULT_OPSET', 'MAX_OPSET', 'export_onnx', 'check_onnx']

DEFAULT_OPSET = 17
try:  # the newest opset torch.onnx.export(dynamo=False) writes
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:
    MAX_OPSET = 20


def export_onnx(model: nn.Module, path: str, example: Optional[torch.Tensor] = None, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, verbose: bool = False) -> str:
    """Export `model` (eval mode) to `path`; returns the absolute path."""
    if not 17 <= opset <= MAX_OPSET:
        raise ValueError(f'opset must be in [17, {MAX_OPSET}] (the TorchScript exporter\'s range), got {opset}')
    p = next(model.parameters(), None)
    if p is not None and p.dtype == torch.bfloat16:  # (the exporter fails deep inside on the pruned attention)
        raise ValueError('ONNX export of a bfloat16 model is not supported (ONNX Runtime has no bfloat16 CPU '
                         'kernels for this graph either); export a float32 or float16 copy (model.float())')
    model = model.eval()
    if example is None:
        example = example_input(model, 1)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.snp_fast_', suffix='.onnx', dir=parent)
    os.close(fd)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
            warnings.simplefilter('ignore')
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=opset, input_names=['image'],
                output_names=['logits'], do_constant_folding=True,
                dynamic_axes={'image': {0: 'batch'}, 'logits': {0: 'batch'}} if dynamic_batch else None)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def check_onnx(model: nn.Module, path: str, batch: int = 2, seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch on a random input of `batch` images."""
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(path)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model_input_size(model), generator=g)
    model = model.eval()
    p = next(model.parameters())
    if p.dtype == torch.bfloat16:
        raise ValueError('check_onnx: ONNX Runtime has no bfloat16 CPU kernels for this graph; export and check a '
                         'float32 copy (model.float()) instead')
    x = x.to(p.dtype)  # the graph's input has the model's dtype
    with torch.no_grad():
        ref = model(x.to(p.device)).float().cpu()
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(out).float() - ref).abs().max())
