"""SNP pruning of a timm VisionTransformer into a real, smaller model (SNP.md).

Pipeline (one pass over the original model, block by block, on the calibration images):
  1. the residual-stream (embedding) selection, shared by all blocks, from the weights (or from one
     extra forward pass for the "activation" criterion); the pruned model's skeleton is built on the
     meta device and its stem and head are sliced;
  2. for block b: run the ORIGINAL block on its calibration hidden states X, capturing q/k and the
     outputs of qkv, proj, fc1 and fc2; score and select q/k pairs, v and fc1 filters; slice the
     block; then (re-fit on) re-fit qkv, proj, fc1 and fc2 in that order, each from the PRUNED
     model's own inputs (hidden states X') to the original outputs at the kept rows; advance X, X';
  3. re-fit the classifier head(s) from the pruned features to the original logits.
Memory: one block's activations plus the two sets of calibration hidden states.

This is SNP.md's "one pass for the scores, then block by block" with the two passes merged: block b's
Q/K scores only need block b's own q and k, so the original model runs once.
"""
import ctypes
import functools
import math
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import __version__, ops
from .macs import count_macs, count_params, meta_copy
from .models import roles, vit
from .models.vit import BlockSelection, ModelDims, Selection
from .ratios import DROP_KEYS, preset_mismatch, resolve_ratios, target_dims
from .refit import DEFAULT_DAMP, LinearFit, RefitStats
from .scores import (EMBED_CRITERIA, HEAD_CRITERIA, QK_CRITERIA, ROW_CRITERIA, check_criterion, head_energy,
                     head_output, qk_magnitude, row_scores, select_per_head, select_top, tss_average)

__all__ = ['prune', 'PruneReport', 'RECIPE_FORMAT', 'branch_scores', 'BRANCH_CRITERIA']

RECIPE_FORMAT = 'snp_fast.recipe/1'
PHASES = ('calibration', 'qk_scoring', 'redundancy', 'selection', 'slicing', 'refit', 'rebuild')


@dataclass
class PruneReport:
    """What prune() did: sizes before/after, per-block widths, time per phase, re-fit errors."""
    dims_before: ModelDims
    dims_after: ModelDims
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    times: Dict[str, float]
    settings: dict
    refit: Dict[str, RefitStats] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {'dims_before': self.dims_before.to_dict(), 'dims_after': self.dims_after.to_dict(),
                'params_before': self.params_before, 'params_after': self.params_after,
                'macs_before': self.macs_before, 'macs_after': self.macs_after, 'times': dict(self.times),
                'settings': dict(self.settings), 'refit': {k: v.to_dict() for k, v in self.refit.items()},
                'notes': list(self.notes)}

    def summary(self) -> str:
        lines = self._size_lines()
        total = sum(self.times.values())
        lines.append('time: ' + ', '.join(f'{k} {v:.2f}s' for k, v in self.times.items() if v > 0)
                     + f'; total {total:.2f}s')
        if self.refit:
            worst = max(self.refit.items(), key=lambda kv: kv[1].err_refit)
            lines.append(f're-fit: {len(self.refit)} layers, worst relative error {worst[1].err_refit:.3g} '
                         f'({worst[0]}, {worst[1].err_sliced:.3g} before)')
        lines += [f'note: {n}' for n in self.notes]
        return '\n'.join(lines)

    def _totals(self) -> str:
        return (f'params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M '
                f'({self.params_after / self.params_before:.1%}),  '
                f'MACs {self.macs_before / 1e9:.3f}G -> {self.macs_after / 1e9:.3f}G '
                f'({self.macs_after / self.macs_before:.1%})')

    def _size_lines(self) -> List[str]:
        """Totals and the per-block widths (a model family's report may show other widths)."""
        b, a = self.dims_before, self.dims_after
        lines = [f'{self._totals()},  embed {b.embed} -> {a.embed}',
                 f'{"block":>5} {"heads":>8} {"q/k per head":>13} {"v per head":>11} {"fc1":>11}']
        for i, (x, y) in enumerate(zip(b.blocks, a.blocks)):  # 0 heads / 0 fc1: the branch is dropped
            lines.append(f'{i:>5} {x.heads:>2} -> {y.heads:<2} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4} '
                         f'{x.mlp:>4} -> {y.mlp:<5}')
        return lines

    def __str__(self) -> str:
        return self.summary()


class _Timer:
    """Seconds per phase. Phases nest: time inside an inner phase counts for it alone (the outer one
    pauses), so the phases add up to the whole."""

    def __init__(self):
        self.times = {p: 0.0 for p in PHASES}
        self._open: List[list] = []  # [phase, start of its current stretch], innermost last

    @contextmanager
    def __call__(self, phase: str):
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.times[outer[0]] += now - outer[1]
        self._open.append([phase, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            name, t0 = self._open.pop()
            self.times[name] = self.times.get(name, 0.0) + now - t0
            if self._open:
                self._open[-1][1] = now


def _row_scores(timer: _Timer, weight: torch.Tensor, criterion: str, act_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores.row_scores, its time on the "redundancy" phase for that criterion (the largest part of selection)."""
    with timer('redundancy') if criterion == 'redundancy' else nullcontext():
        return row_scores(weight, criterion, act_sq)


# ------------------------------------------------------------------------------------------------
# input checks

def _check_calib(model: nn.Module, calib) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor):
        raise TypeError(f'calib must be a float tensor of images (B, C, H, W), got {type(calib).__name__}')
    if calib.dim() != 4 or not calib.is_floating_point() or calib.shape[0] < 1:
        raise ValueError(f'calib must be a float tensor of images (B, C, H, W), got {calib.dtype} '
                         f'{tuple(calib.shape)}')
    c = getattr(model, 'in_chans', calib.shape[1])
    if calib.shape[1] != c:
        raise ValueError(f'calib has {calib.shape[1]} channels but the model takes {c}')
    img = tuple(getattr(model.patch_embed, 'img_size', None) or calib.shape[2:])
    if not getattr(model, 'dynamic_img_size', False) and tuple(calib.shape[2:]) != img:
        raise ValueError(f'calib images are {tuple(calib.shape[2:])} but the model takes {img}')
    if not torch.isfinite(calib).all():
        raise ValueError('calib contains NaN or Inf values')
    return calib


def _finite(t: torch.Tensor, where: str) -> torch.Tensor:
    # one reduction instead of an elementwise mask: a NaN or Inf anywhere makes the sum non-finite (summed in
    # fp32 at least: a half-precision sum of finite activations overflows past 65504)
    if not torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32))):
        raise FloatingPointError(f'non-finite activations (NaN/Inf) at {where}; check the model weights and '
                                 'calibration images')
    return t


# ------------------------------------------------------------------------------------------------
# running pieces of the model on the calibration set, in chunks of images

def _chunks(x: torch.Tensor, size: int):
    for s in range(0, x.shape[0], size):
        yield x[s:s + size]


@torch.no_grad()
def _prefix(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Hidden states entering the first block."""
    out = []
    for x in _chunks(images, batch):
        x = model.patch_embed(x)
        if hasattr(model, '_pos_embed'):
            x = model._pos_embed(x)
            # the Eva family's _pos_embed also returns the RoPE tables (see _block_kwargs) and drops patches itself
            x = x[0] if isinstance(x, tuple) else model.patch_drop(x)
        elif model.cls_token is not None:  # VisionTransformerRelPos: positions are attention biases (_block_kwargs)
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        out.append(getattr(model, 'norm_pre', nn.Identity())(x))
    return _cat(out)


@torch.no_grad()
def _block_kwargs(model: nn.Module, images: torch.Tensor) -> List[dict]:
    """Keyword arguments the model's forward passes to each block: the RoPE tables of the Eva family
    (one table for all blocks, or one per block for 'mixed' RoPE), VisionTransformerRelPos's shared
    relative-position bias, nothing for a plain ViT."""
    if getattr(model, 'shared_rel_pos', None) is not None:
        return [{'shared_rel_pos': model.shared_rel_pos.get_bias()} for _ in model.blocks]
    if getattr(model, 'rope', None) is None:
        return [{} for _ in model.blocks]
    _, rope = model._pos_embed(model.patch_embed(images[:1]))
    if getattr(model, 'rope_mixed', False):
        return [{'rope': rope[i]} for i in range(len(model.blocks))]
    return [{'rope': rope} for _ in model.blocks]


@torch.no_grad()
def _run_captured(module: nn.Module, x: torch.Tensor, taps: Dict[str, tuple], batch: int,
                  kwargs: Optional[dict] = None):
    """module(x, **kwargs) in chunks; returns (output, {name: captured 'in'put or 'out'put of a submodule}).

    A tap is (submodule, 'in' | 'out') or (submodule, 'in' | 'out', kept last-dim indices): then only those
    columns are kept, sliced as they come, so the full activation is never held beyond its own forward."""
    store = defaultdict(list)
    handles = []
    for name, (sub, which, *cols) in taps.items():
        def hook(_m, inp, out, name=name, which=which, cols=cols[0] if cols else None):
            t = inp[0] if which == 'in' else out
            store[name].append(t if cols is None else _take_cols(t, cols))
        handles.append(sub.register_forward_hook(hook))
    try:
        outs = [module(c, **(kwargs or {})) for c in _chunks(x, batch)]
    finally:
        for h in handles:
            h.remove()
    return _cat(outs), {k: _cat(v) for k, v in store.items()}


def _take_cols(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t[..., cols] through ops.gather_slices (its CPU kernel gathers row by row: several times faster
    than index_select along the last dim, which walks the columns)."""
    flat = t.reshape(t.shape[:-1].numel(), t.shape[-1])
    return ops.gather_slices([flat], [[(1, cols)]])[0].view(*t.shape[:-1], cols.numel())


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _apply(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return _cat([fn(c) for c in _chunks(x, batch)])


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc: nothing to call
        return None


def _release_heap() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's malloc_trim). glibc keeps the freed
    activations of the blocks and fits before resident for reuse, in holes between live tensors, so they
    add to the peak beside the growing pruned model (ViT-L, 16 images: ~0.1x the model's size); the
    price is page faults when that memory is used again."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _assign(model: nn.Module, tensors: Dict[str, torch.Tensor], like: Dict[str, torch.Tensor]) -> None:
    """Put sliced tensors into the (meta) skeleton as its parameters."""
    for name, t in tensors.items():
        mod_name, _, leaf = name.rpartition('.')
        mod = model.get_submodule(mod_name) if mod_name else model
        setattr(mod, leaf, nn.Parameter(t, requires_grad=like[name].requires_grad))


def _copy_buffers(pruned: nn.Module, model: nn.Module) -> None:
    """The ViT family's buffers (if any) are not pruned: copy them over, persistent or not as they were."""
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():
        mod_name, _, leaf = name.rpartition('.')
        (pruned.get_submodule(mod_name) if mod_name else pruned).register_buffer(leaf, buf.clone(),
                                                                                persistent=name in persistent)


def _slice_into(pruned: nn.Module, model: nn.Module, plan: vit.Plan, names: List[str]) -> None:
    """The one slicing routine: every tensor in `names`, sliced by `plan` (or copied), in one call."""
    src = dict(model.named_parameters())
    sliced = [n for n in names if n in plan]
    out = ops.gather_slices([src[n].detach() for n in sliced], [plan[n] for n in sliced])
    tensors = dict(zip(sliced, out))
    for n in names:
        if n not in plan:
            tensors[n] = src[n].detach().clone()
    _assign(pruned, tensors, src)


# ------------------------------------------------------------------------------------------------
# embedding (residual-stream) selection

def _embed_scores(model: nn.Module, criterion: str, calib: Optional[torch.Tensor], batch: int,
                  timer: _Timer) -> torch.Tensor:
    if criterion == 'activation':
        if calib is None:
            raise ValueError('embed_criterion="activation" needs calibration images')
        x = _prefix(model, calib, batch)
        per_block = []
        for i, (blk, kw) in enumerate(zip(model.blocks, _block_kwargs(model, calib))):
            x = _finite(_apply(lambda t: blk(t, **kw), x, batch), f'the output of blocks.{i} of the original model')
            per_block.append(x.float().pow(2).sum(dim=(0, 1)).sqrt())
        return tss_average(per_block)
    producers = [model.patch_embed.proj.weight.flatten(1)]
    for blk in model.blocks:
        for i, w in ((1, blk.attn.proj.weight), (2, blk.mlp.fc2.weight)):
            # (cosines of rows, the redundancy scores, do not change with row scales: no scaled copies)
            producers.append(w if criterion == 'redundancy' else _scaled_rows(blk, i, w))
    return tss_average([_row_scores(timer, w, criterion) for w in producers])


def _scaled_rows(blk: nn.Module, i: int, w: torch.Tensor) -> torch.Tensor:
    """The rows of branch i's output layer as they reach the stream, for a row-norm criterion: times the
    branch's LayerScale, when it has one (a post-norm block's norm is no per-channel gain: left out)."""
    gain = None if roles.is_post_norm(blk) else getattr(getattr(blk, f'ls{i}', None), 'gamma',
                                                        getattr(blk, f'gamma_{i}', None))
    return w if gain is None else w.detach() * gain.detach().to(w.dtype).unsqueeze(1)


# ------------------------------------------------------------------------------------------------

def prune(
        model: nn.Module,
        calib: Optional[torch.Tensor] = None,
        ratios: Union[float, dict, str, None] = None,
        *,
        preset: Optional[str] = None,
        qk_criterion: str = 'snp',
        v_criterion: str = 'redundancy',
        mlp_criterion: str = 'redundancy',
        embed_criterion: str = 'redundancy',
        head_criterion: str = 'snp',
        gamma: Optional[int] = None,
        refit: Union[bool, str] = True,
        damp: float = DEFAULT_DAMP,
        refit_tokens: Optional[int] = None,
        batch_size: int = 32,
        backend: str = 'auto',
        precision: str = 'fp32',
        timm_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
) -> Tuple[nn.Module, PruneReport]:
    """Prune a timm VisionTransformer with SNP; returns (a new, smaller model, a PruneReport).

    The original model is left untouched.

    Args:
        model: a timm VisionTransformer (vit_*, deit_*, deit3_*, *_distilled, register tokens, ...).
        calib: calibration images (B, C, H, W), preprocessed as for the model. Needed for the "snp"
            Q/K criterion, "activation" criteria and the re-fit; 16-64 images are typical.
        ratios: fraction of dims REMOVED: a float (q/k, v, fc1 and embedding alike), a dict
            {'qk', 'v', 'mlp', 'heads', 'embed'} for every block, {'blocks': [...], 'embed'} per block, or a
            preset name (see snp_fast.list_presets()). 'heads' removes whole heads (then SNP inside the
            kept ones); 'drop_attn' / 'drop_mlp' (block indices, or a count chosen by branch_scores)
            remove whole attention / MLP branches (see snp_fast.ratios).
        preset: a preset name (alternative to `ratios`).
        qk_criterion: "snp" (attention-score preservation) or "magnitude".
        v_criterion, mlp_criterion: "redundancy" (the paper's), "magnitude" or "activation".
        embed_criterion: "redundancy" (TSS-averaged over the stream's producers), "magnitude" or
            "activation".
        head_criterion: which heads to keep when 'heads' > 0: "snp" (the default: the head's attention-score
            energy, the top-γ singular values² of Q_h K_hᵀ; top-1 ≥ "output" in all four settings of
            QUALITY.md's head table) or "output" (each head's share of attn.proj's output on the calibration
            tokens).
        gamma: singular components preserved by the "snp" criterion (default: the q/k dims each head
            keeps in that block).
        refit: re-fit every pruned Linear to the original outputs by least squares (needs calib). True or
            "sequential" (the default): each block's inputs are the PRUNED model's own hidden states, so a
            block also corrects the error of the blocks before it; "oneshot": each block is re-fit from the
            ORIGINAL model's hidden states (at the kept channels), blocks independently (ViT family only;
            QUALITY.md compares the two); False: no re-fit.
        damp: ridge strength of the re-fit, relative to the mean diagonal of the Gram matrix.
        refit_tokens: at most this many calibration tokens (sampled, seeded) per Gram matrix; None = all.
        batch_size: images per chunk when running the model on the calibration set.
        backend: the kernels to run, "auto" | "reference" | "cpu" | "cuda" | "triton": every op (Q/K scores,
            redundancy, Gram, slicing) takes this backend where it has one for the model's device and the
            fastest it has otherwise ("triton": the Triton kernels where they exist; "reference": the
            plain-PyTorch versions throughout). A backend with no kernel at all for that device is an error.
        precision: "fp32" (default) or "bf16": the precision of the large products, the redundancy cosines and
            the re-fit's Gram matrices. "bf16" rounds their inputs to bfloat16 (products summed in fp32; on a
            CPU with AMX / AVX512-BF16 several times faster): neighbouring scores may swap, and the selection
            can differ from the pure-Python version's, which "fp32" reproduces (ties aside).
        timm_name, timm_kwargs: how to rebuild the unpruned architecture with timm.create_model, for
            save_pruned/load_pruned (default: inferred from the model).
    """
    args = dict(locals())  # first statement: exactly prune()'s arguments
    if (ratios is None) == (preset is None):
        raise ValueError('give exactly one of ratios= or preset=')
    check_criterion('qk_criterion', qk_criterion, QK_CRITERIA)
    check_criterion('v_criterion', v_criterion, ROW_CRITERIA)
    check_criterion('mlp_criterion', mlp_criterion, ROW_CRITERIA)
    check_criterion('embed_criterion', embed_criterion, EMBED_CRITERIA)
    check_criterion('head_criterion', head_criterion, HEAD_CRITERIA)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    ops.check_backend(backend, next(model.parameters(), torch.empty(0)).device)
    ops.check_precision(precision)
    if gamma is not None and gamma < 1:
        raise ValueError(f'gamma must be >= 1, got {gamma}')
    if refit not in (True, False, 'sequential', 'oneshot'):
        raise ValueError(f'refit must be True/"sequential", "oneshot" or False, got {refit!r}')
    from .models import efficientformer
    if efficientformer.is_efficientformer(model):  # another family: its own pipeline, the same (checked) arguments
        if refit == 'oneshot':
            raise ValueError('refit="oneshot" is available for the ViT family only; use refit=True (sequential)')
        return efficientformer.prune(**args)
    vit.check_supported(model)
    needs_data = refit or 'snp' == qk_criterion or 'activation' in (v_criterion, mlp_criterion, embed_criterion)
    if needs_data and calib is None:
        raise ValueError('calibration images are needed (calib=...) for the re-fit, the "snp" Q/K criterion and '
                         '"activation" criteria; pass refit=False and weight-only criteria to prune without data')
    device = next(model.parameters()).device
    if calib is not None:
        calib = _check_calib(model, calib).to(device=device, dtype=next(model.parameters()).dtype)

    timer = _Timer()
    notes: List[str] = []
    dims_before = vit.model_dims(model)
    mismatch = preset_mismatch(preset, dims_before) if preset is not None else None
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
        notes.append(mismatch)
    spec = resolve_ratios(preset if preset is not None else ratios, len(dims_before.blocks))
    if any(isinstance(spec[k], int) and spec[k] for k in DROP_KEYS):  # counts: the least contributing branches
        if calib is None:
            raise ValueError('ratios drop_attn / drop_mlp given as a number of blocks need calibration images (calib=) '
                             'to score the branches; give block indices to drop without data')
        with timer('selection'):
            spec = _choose_dropped(model, calib, spec, batch_size, notes)
    dims_after = target_dims(dims_before, spec, notes)
    if calib is None and any(0 < a.heads < b.heads for a, b in zip(dims_after.blocks, dims_before.blocks)):
        raise ValueError('head pruning ("heads" ratios) scores the heads on calibration images; pass calib=')
    fixed_qk = vit.fixed_qk_reason(model)
    if fixed_qk and any(a.heads and a.qk != b.qk for a, b in zip(dims_after.blocks, dims_before.blocks)):
        raise ValueError(f'{fixed_qk}, so q/k dims cannot be pruned; set the qk ratios to 0 (v, fc1 and embedding '
                         'pruning remain available)')
    if refit_tokens is not None and (not isinstance(refit_tokens, int) or refit_tokens < 1):
        raise ValueError(f'refit_tokens must be None (all tokens) or a positive int, got {refit_tokens!r}')
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f'damp must be a finite number >= 0, got {damp!r}')
    timm_config = resolve_timm_config(model, timm_name, timm_kwargs)

    with eval_mode(model) as modes, ops.prefer(backend), ops.precision(precision):  # every op: `backend` where it has it
        pruned, selection, refit_stats = _prune(
            model, calib, dims_before, dims_after, timer, qk_criterion=qk_criterion, v_criterion=v_criterion,
            mlp_criterion=mlp_criterion, embed_criterion=embed_criterion, head_criterion=head_criterion, gamma=gamma,
            refit=refit, damp=damp, refit_tokens=refit_tokens, batch=batch_size)
    copy_modes(pruned, modes)
    report = record(model, pruned, 'vit', PruneReport, timm_config, dims_before, dims_after, selection,
                    run_settings(args, spec, calib), timer, refit_stats, notes)
    return pruned, report


def resolve_timm_config(model: nn.Module, timm_name: Optional[str], timm_kwargs: Optional[dict]):
    """(timm name, kwargs, why not inferable) that rebuild the unpruned architecture: inferred from the model
    unless given; kwargs inferred for a given name only when it is the model's own."""
    from .io import infer_timm_config
    if timm_name is None:
        return infer_timm_config(model, timm_kwargs)
    if timm_kwargs is None:
        inferred_name, timm_kwargs, _ = infer_timm_config(model)
        if inferred_name != timm_name:
            timm_kwargs = {}
    return timm_name, timm_kwargs, ''


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the block; yields every module's training flag by name and restores them
    module by module afterwards (a BatchNorm frozen in a training model stays frozen)."""
    modes = {n: m.training for n, m in model.named_modules()}
    model.eval()
    try:
        yield modes
    finally:
        for n, m in model.named_modules():
            m.training = modes.get(n, m.training)
        _drop_eval_caches(model)


def copy_modes(pruned: nn.Module, modes: Dict[str, bool]) -> nn.Module:
    """Give the pruned model the original's training flags, module by module (new modules: the model's)."""
    top = modes.get('', False)
    for n, m in pruned.named_modules():
        m.training = modes.get(n, top)
    _drop_eval_caches(pruned)
    return pruned


def _drop_eval_caches(model: nn.Module) -> None:
    # timm's attention-bias tables (EfficientFormer, LeViT, ...) are cached on an eval forward and cleared only
    # by train(True); the flags above are set directly, so a cache of these runs would outlive later changes of
    # the biases (training the original, loading weights into the pruned model)
    for m in model.modules():
        if isinstance(getattr(m, 'attention_bias_cache', None), dict):
            m.attention_bias_cache = {}


# prune() arguments recorded in the recipe's settings (with the resolved ratios and the calibration count)
SETTING_KEYS = ('preset', 'qk_criterion', 'v_criterion', 'mlp_criterion', 'embed_criterion', 'head_criterion',
                'gamma', 'refit', 'damp', 'refit_tokens')


def run_settings(args: dict, spec: dict, calib: Optional[torch.Tensor]) -> dict:
    """The settings a recipe records, from prune()'s arguments."""
    return dict(ratios=spec, **{k: args[k] for k in SETTING_KEYS},
                calib_images=0 if calib is None else calib.shape[0], backend=args['backend'],
                precision=args['precision'])


def record(model, pruned, family: str, report_cls, timm_config, dims_before, dims_after, selection, settings: dict,
           timer: '_Timer', refit_stats, notes) -> PruneReport:
    """Attach the recipe (how to rebuild and what was kept) to `pruned` and return its report; shared by the
    model families' pipelines."""
    timm_name, timm_kwargs, timm_unavailable = timm_config
    pruned.snp_recipe = {
        'format': RECIPE_FORMAT, 'snp_fast_version': __version__, 'family': family,
        'timm_name': timm_name, 'timm_kwargs': timm_kwargs, 'timm_unavailable': timm_unavailable,
        'dims_before': dims_before.to_dict(), 'dims_after': dims_after.to_dict(),
        'selection': selection.to_dict(), 'settings': settings,
    }
    return report_cls(dims_before, dims_after, count_params(model), count_params(pruned), count_macs(model),
                      count_macs(pruned), timer.times, settings, refit_stats, notes)


def _prune(model, calib, dims_before, dims_after, timer, *, qk_criterion, v_criterion, mlp_criterion,
           embed_criterion, head_criterion, gamma, refit, damp, refit_tokens, batch):
    n_embed = dims_before.embed
    with timer('selection'):
        if dims_after.embed < n_embed:
            embed = select_top(_embed_scores(model, embed_criterion, calib, batch, timer), dims_after.embed)
        else:
            embed = torch.arange(n_embed)
    with timer('rebuild'):
        pruned = vit.apply_dims(meta_copy(model), dims_after)
    plan = vit.stem_and_head_plan(model, embed)
    block_names = {n for n, _ in model.named_parameters() if n.startswith('blocks.')}
    with timer('slicing'):
        _slice_into(pruned, model, plan, [n for n, _ in model.named_parameters() if n not in block_names])
    _copy_buffers(pruned, model)

    x = xp = None
    kws = [{} for _ in model.blocks]
    if calib is not None:
        with timer('calibration'):
            x = _prefix(model, calib, batch)
            kws = _block_kwargs(model, calib)
        if refit:
            with timer('refit'):
                xp = _prefix(pruned, calib, batch)
    gen = torch.Generator().manual_seed(0)
    stats: Dict[str, RefitStats] = {}
    selections: List[BlockSelection] = []
    for i, (ob, pb) in enumerate(zip(model.blocks, pruned.blocks)):
        _release_heap()  # what the block before freed: its run below is the peak, on top of the pruned blocks
        bd, od = dims_after.blocks[i], dims_before.blocks[i]
        H, d = od.heads, od.qk
        m_sel = None  # FFN neurons chosen from the weights are known before the run: only their fc1 outputs are kept
        if mlp_criterion != 'activation' or bd.mlp in (0, od.mlp):
            with timer('selection'):
                m_sel = _select_mlp(ob.mlp, bd.mlp, mlp_criterion, None, timer)
        cap = {}
        if x is not None:
            with timer('calibration'):
                taps = _block_taps(ob, embed if refit else None, m_sel, fc2_in=m_sel is None)
                if head_criterion == 'output' and 0 < bd.heads < H:
                    taps['proj_in'] = (ob.attn.proj, 'in')
                x_next, cap = _run_captured(ob, x, taps, batch, kws[i])
                if 'attn_in' in cap:
                    cap['qkv'] = roles.qkv_output(ob.attn, cap.pop('attn_in'))
                _finite(x_next, f'the output of blocks.{i} of the original model')
        with timer('selection'):
            heads = _select_heads(ob.attn, cap, bd, od, head_criterion, gamma, batch)
        with timer('qk_scoring'):
            if bd.heads == 0 or bd.qk == d:  # nothing to choose inside the kept heads (none, or all dims)
                qk_sel = torch.arange(bd.qk).expand(bd.heads, bd.qk).clone()
            elif qk_criterion == 'snp':
                q, k = _split_qk(ob.attn, cap['qkv'], H, d)
                if heads.numel() < H:  # (all heads kept: the strided views, no copy)
                    q, k = q[:, heads], k[:, heads]
                s = sum(ops.qk_scores(qc, kc, gamma or bd.qk)
                        for qc, kc in zip(_chunks(q, batch), _chunks(k, batch)))
                qk_sel = select_per_head(s, bd.qk)
                del q, k  # not held through the re-fit
            else:
                qk_sel = select_per_head(qk_magnitude(roles.qkv_weight(ob.attn)[0], H, d)[heads], bd.qk)
        with timer('selection'):
            g = roles.kv_groups(ob.attn)  # grouped-query attention: v filters belong to the H / g value heads
            if bd.heads == 0 or bd.v == d:
                v_sel = torch.arange(bd.v).expand(bd.heads // g, bd.v).clone()
            else:  # value filters of the kept heads only compete with each other
                rows = vit._head_rows(torch.arange(d).expand(bd.heads // g, d), d, (H + H // g) * d,
                                      heads if g == 1 else None)
                v_w = roles.qkv_weight(ob.attn)[0][rows]
                act = (_take_cols(cap['qkv'], rows.to(cap['qkv'].device)).float().pow(2).sum(dim=(0, 1))
                       if v_criterion == 'activation' else None)
                v_sel = select_per_head(_row_scores(timer, v_w, v_criterion, act).view(bd.heads // g, d), bd.v)
            if m_sel is None:  # the "activation" criterion: the captured fc1 outputs are cut to the kept rows now
                m_sel = _select_mlp(ob.mlp, bd.mlp, mlp_criterion, cap.pop('fc2_in').float().pow(2).sum(dim=(0, 1)),
                                    timer)
                for name, rows in roles.mlp_fc1_rows(ob.mlp, m_sel).items():
                    if name in cap:
                        cap[name] = _take_cols(cap[name], rows.to(cap[name].device))
        sel = BlockSelection(qk_sel, v_sel, m_sel, heads if bd.heads < H else None)
        selections.append(sel)
        bplan = vit.block_plan(model, i, sel, embed)
        with timer('slicing'):
            _slice_into(pruned, model, bplan, sorted(n for n in block_names if n.startswith(f'blocks.{i}.')))
        if refit:
            with timer('refit'):
                if refit == 'oneshot':  # this block's inputs: the original hidden states at the kept channels
                    xp = x.index_select(-1, embed.to(x.device))
                xp = _refit_block(pb, xp, cap, sel, H, d, damp, refit_tokens, gen, batch, stats, i,
                                  kws[i])
        x = x_next if x is not None else None
        cap.clear()
    if refit:
        with timer('refit'):
            _refit_heads(model, pruned, x, xp, embed, damp, refit_tokens, gen, batch, stats)
    leftover = [n for n, p in pruned.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f'internal error: parameters left unassigned after pruning: {leftover[:5]}')
    return pruned, Selection(embed, selections), stats


def _select_mlp(mlp: nn.Module, keep: int, criterion: str, act: Optional[torch.Tensor], timer: _Timer) -> torch.Tensor:
    """Kept FFN neurons (sorted); act: per-neuron sum of squared fc2 inputs, for the "activation" criterion."""
    if keep in (0, roles.mlp_hidden(mlp)):
        return torch.arange(keep)
    return select_top(_row_scores(timer, roles.mlp_in_weight(mlp), criterion, act), keep)


def _select_heads(attn: nn.Module, cap: dict, bd: vit.BlockDims, od: vit.BlockDims, criterion: str,
                  gamma: Optional[int], batch: int) -> torch.Tensor:
    """Kept original head indices (sorted): the bd.heads heads with the highest head_criterion score."""
    if bd.heads in (0, od.heads):
        return torch.arange(bd.heads)
    H, d = od.heads, od.qk
    if criterion == 'snp':
        q, k = _split_qk(attn, cap['qkv'], H, d)
        s = sum(head_energy(qc, kc, gamma or bd.qk) for qc, kc in zip(_chunks(q, batch), _chunks(k, batch)))
    else:
        s = head_output(cap['proj_in'], attn.proj.weight, H)
    return select_top(s, bd.heads)


BRANCH_CRITERIA = ('ablation', 'norm')


@torch.no_grad()
def branch_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 32, criterion: str = 'ablation',
                  max_images: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """(attn, mlp): per block, how much each residual branch matters on the calibration images, measured
    on the ORIGINAL model; drop counts (drop_attn / drop_mlp) remove the branches with the lowest scores.

    "ablation" (what prune() uses): the relative change ‖f' − f‖_F / ‖f‖_F of the final normed features
    (all tokens) when that one branch is replaced by what dropping leaves of it, its mean output (the
    re-fit bias), and the rest of the network runs on. Cost: O(depth²) block runs, so only the first
    `max_images` calibration images are used (and the stream entering every branch is kept for them).
    "norm": the branch's local size ‖branch(x)‖_F / ‖x‖_F with x the stream entering it: one pass, but it
    cannot see what later blocks need (on the digits ViT it ranks block 0's attention, the most harmful
    to drop, as the least important)."""
    check_criterion('criterion', criterion, BRANCH_CRITERIA)
    if criterion == 'ablation':
        calib = calib[:max_images]
    with eval_mode(model):
        branches = []  # (attention, MLP) of each block as functions of the stream, with the block's kwargs
        for blk, kw in zip(model.blocks, _block_kwargs(model, calib)):
            ls1, ls2 = roles.branch_scale(blk, 1), roles.branch_scale(blk, 2)
            branches += [lambda t, blk=blk, kw=kw, ls=ls1: ls(blk.attn(roles.branch_input(blk, 1)(t), **kw)),
                         lambda t, blk=blk, ls=ls2: ls(blk.mlp(roles.branch_input(blk, 2)(t)))]
        x = _prefix(model, calib, batch_size)
        inputs, means, local = [], [], []
        for f in branches:
            out = _apply(f, x, batch_size)
            inputs.append(x)
            means.append(out.mean(dim=(0, 1)))
            local.append(out.double().norm() / x.double().norm())
            x = x + out
        if criterion == 'norm':
            scores = torch.stack(local)
        else:
            final_norm = getattr(model, 'norm', nn.Identity())
            ref = _apply(final_norm, x, batch_size).double()
            scores = []
            for j in range(len(branches)):
                y = inputs[j] + means[j]
                for f in branches[j + 1:]:
                    y = y + _apply(f, y, batch_size)
                scores.append((_apply(final_norm, y, batch_size).double() - ref).norm() / ref.norm())
            scores = torch.stack(scores)
    return scores[0::2].float(), scores[1::2].float()


def _choose_dropped(model: nn.Module, calib: torch.Tensor, spec: dict, batch: int, notes: List[str]) -> dict:
    """Replace drop counts in `spec` by the block indices of the least contributing branches."""
    scores = dict(zip(DROP_KEYS, branch_scores(model, calib, batch)))
    spec = dict(spec)
    for key in DROP_KEYS:
        n = spec[key]
        if isinstance(n, int):
            spec[key] = select_top(-scores[key], n).tolist() if n else []
            if n:
                notes.append(f'{key}: blocks {spec[key]} (output change when dropped '
                             + ', '.join(f'{scores[key][j]:.3g}' for j in spec[key]) + ')')
    return spec


def _block_taps(blk: nn.Module, embed: Optional[torch.Tensor] = None, mlp_sel: Optional[torch.Tensor] = None,
                fc2_in: bool = False) -> Dict[str, tuple]:
    """What scoring and the re-fit capture from an original block, and no more: q/k/v (or, when the
    projection is not a single Linear call, e.g. EvaAttention's F.linear with separate biases, the
    attention's input); with `embed` (the kept residual channels: re-fit on) the re-fit targets, each cut
    to what the pruned block keeps: proj's and fc2's outputs at `embed`, every fc1 output at the rows of
    the kept neurons `mlp_sel` (all rows when None: cut after selection), an output gate's output (all
    rows); fc2's input when `fc2_in` (the "activation" FFN criterion)."""
    a, mlp = blk.attn, blk.mlp
    taps = {'qkv': (a.qkv, 'out')} if roles.qkv_layout(a) == 'fused' else {'attn_in': (a, 'in')}
    if embed is not None:
        dev = a.proj.weight.device
        e = embed.to(dev)
        if getattr(a, 'gate', None) is not None:  # (all rows: the kept value filters are chosen after the run)
            taps['gate'] = (a.gate, 'out')
        for name, rows in roles.mlp_fc1_rows(mlp, torch.arange(0) if mlp_sel is None else mlp_sel).items():
            taps[name] = (getattr(mlp, name), 'out') if mlp_sel is None else (getattr(mlp, name), 'out', rows.to(dev))
        taps.update({'proj_out': (a.proj, 'out', e), 'fc2_out': (mlp.fc2, 'out', e)})
    if fc2_in:
        taps['fc2_in'] = (mlp.fc2, 'in')
    return taps


def _split_qk(attn: nn.Module, qkv: torch.Tensor, H: int, d: int):
    B, N, _ = qkv.shape
    qkv = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


def _token_subset(n: int, budget: Optional[int], gen: torch.Generator) -> Optional[torch.Tensor]:
    if budget is None or budget >= n:
        return None
    return torch.randperm(n, generator=gen)[:budget].sort().values


def _fit(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, rows: Optional[torch.Tensor], damp: float,
         pred: Optional[torch.Tensor] = None) -> RefitStats:
    _release_heap()  # the solve's fresh n×n float64 matrices should not come on top of what earlier fits freed
    x = x.reshape(y.shape[:-1].numel(), x.shape[-1])  # not (-1, 0): a dropped branch's input has zero width
    y = y.reshape(-1, y.shape[-1])
    pred = None if pred is None else pred.reshape(-1, pred.shape[-1])
    if rows is not None:
        rows = rows.to(x.device)
        x, y = x.index_select(0, rows), y.index_select(0, rows)
        pred = None if pred is None else pred.index_select(0, rows)
    if layer.in_features == 0:
        return _fit_constant(layer, y)
    fit = LinearFit(layer)
    fit.add(x, y, pred)
    return fit.solve(damp)


@torch.no_grad()
def _fit_constant(layer: nn.Linear, y: torch.Tensor) -> RefitStats:
    """The re-fit of a zero-width layer (a dropped branch): its bias becomes the mean target."""
    y = y.double()
    yy = y.pow(2).sum().clamp_min(torch.finfo(torch.float64).tiny)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(y[0])
    before = float((y - b).pow(2).sum() / yy)
    if layer.bias is None:
        return RefitStats(y.shape[0], before, before)
    mean = y.mean(0)
    layer.bias.data.copy_(mean.to(layer.bias.dtype))
    return RefitStats(y.shape[0], before, float((y - mean).pow(2).sum() / yy))


@torch.no_grad()
def _refit_block(pb, xp, cap, sel, H, d, damp, refit_tokens, gen, batch, stats, i, kwargs=None):
    """Sequential re-fit of one pruned block: qkv, proj, fc1, fc2 (SNP.md, "Compensation").

    cap: the original block's captures as _block_taps(ob, embed, sel.mlp) gives them (the full [q | k | v],
    the other targets already cut to what the pruned block keeps); each is dropped from `cap` once its
    layer is fitted, so the block's later fits do not hold the earlier targets. kwargs: what the block's
    forward gets besides x (RoPE)."""
    dev = xp.device
    rows = _token_subset(xp.shape[0] * xp.shape[1], refit_tokens, gen)
    q_rows = vit._head_rows(sel.qk, d, heads=sel.heads)
    g = roles.kv_groups(pb.attn)  # grouped-query attention (RoPE, q/k whole): all of k's H / g heads
    k_rows = q_rows if g == 1 else torch.arange(H // g * d)
    qkv_rows = torch.cat([q_rows, k_rows + H * d, vit._head_rows(sel.v, d, (H + H // g) * d, sel.heads)]).to(dev)
    p = f'blocks.{i}'

    n1 = _apply(roles.branch_input(pb, 1), xp, batch)
    if qkv_rows.numel():  # else the attention branch is dropped: only proj's constant output is fitted
        for name, layer, cols, write_back in roles.qkv_fit_parts(pb.attn, sel.qk.numel(), sel.v.numel(),
                                                                 k_rows.numel()):
            target = _take_cols(cap['qkv'], qkv_rows[cols.to(dev)])
            stats[f'{p}.attn.{name}'] = _fit(layer, n1, target, rows, damp)
            write_back()
            del target
        if 'gate' in cap:  # the output gate (before its sigmoid), at the kept value columns
            target = _take_cols(cap.pop('gate'), vit.value_out_cols(pb.attn, sel, d).to(dev))
            stats[f'{p}.attn.gate'] = _fit(pb.attn.gate, n1, target, rows, damp)
            del target
    cap.pop('gate', None)
    del cap['qkv']
    # the sliced proj's output on ctx comes with the run: it is the re-fit's starting prediction
    _, c = _run_captured(pb.attn, n1, {'ctx': (pb.attn.proj, 'in'), 'pred': (pb.attn.proj, 'out')}, batch, kwargs)
    stats[f'{p}.attn.proj'] = _fit(pb.attn.proj, c['ctx'], cap.pop('proj_out'), rows, damp, c['pred'])
    ls1, ls2 = roles.branch_scale(pb, 1), roles.branch_scale(pb, 2)
    xp_mid = xp + _apply(lambda t: ls1(pb.attn.proj(t)), c['ctx'], batch)
    del n1, c
    n2 = _apply(roles.branch_input(pb, 2), xp_mid, batch)
    for name in roles.mlp_fc1_rows(pb.mlp, sel.mlp):
        target = cap.pop(name)
        if sel.mlp.numel():
            stats[f'{p}.mlp.{name}'] = _fit(getattr(pb.mlp, name), n2, target, rows, damp)
        del target
    _, c = _run_captured(pb.mlp, n2, {'hidden': (pb.mlp.fc2, 'in'), 'pred': (pb.mlp.fc2, 'out')}, batch)
    stats[f'{p}.mlp.fc2'] = _fit(pb.mlp.fc2, c['hidden'], cap.pop('fc2_out'), rows, damp, c['pred'])
    xp_out = xp_mid + _apply(lambda t: ls2(pb.mlp.fc2(t)), c['hidden'], batch)
    return _finite(xp_out, f'the output of blocks.{i} of the pruned model')


@torch.no_grad()
def _refit_heads(model, pruned, x, xp, embed, damp, refit_tokens, gen, batch, stats):
    head_fn = lambda m: (lambda t: m.forward_head(m.norm(t)))  # noqa: E731
    if getattr(pruned, 'attn_pool', None) is not None:  # the pool reads the pruned stream through kv: re-fit it first
        _, orig = _run_captured(_Call(head_fn(model)), x, {'kv': (model.attn_pool.kv, 'out')}, batch)
        _, new = _run_captured(_Call(head_fn(pruned)), xp, {'kv': (pruned.attn_pool.kv, 'in')}, batch)
        rows = _token_subset(orig['kv'].shape[0] * orig['kv'].shape[1], refit_tokens, gen)
        stats['attn_pool.kv'] = _fit(pruned.attn_pool.kv, new['kv'], orig['kv'], rows, damp)
    names = [n for n in ('head', 'head_dist') if isinstance(getattr(model, n, None), nn.Linear)]
    if not names:
        return
    _, orig = _run_captured(_Call(head_fn(model)), x, {n: (getattr(model, n), 'out') for n in names}, batch)
    _, new = _run_captured(_Call(head_fn(pruned)), xp, {n: (getattr(pruned, n), 'in') for n in names}, batch)
    for n in names:
        rows = _token_subset(new[n].shape[:-1].numel(), refit_tokens, gen)  # (B, C) pooled, (B, N, C) with no pooling
        stats[n] = _fit(getattr(pruned, n), new[n], orig[n], rows, damp)


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
