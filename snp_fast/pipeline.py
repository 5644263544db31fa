"""snp_fast.prune(): SNP on any registered model family, in ONE loop (docs/METHOD.md).

    1. arguments checked once (PruneSettings), the model's family found in the registry, target widths
       resolved from ratios / a preset / a given selection;
    2. the residual-stream selection (shared by every block) from the weights, or one extra forward pass for
       the "activation" criterion; the pruned skeleton built on the meta device, its stem and head sliced;
    3. for each step of the family (a block; for EfficientFormer also its downsamples): run the ORIGINAL
       step on its calibration hidden states X, capturing what scoring and the re-fit need; select; slice;
       re-fit the pruned step from its own inputs X' to the original outputs; advance X and X';
    4. re-fit the classifier head(s) from the pruned features to the original logits.
Memory: one block's activations plus the two sets of calibration hidden states. Block b's Q/K scores need
only block b's own q and k, so the original model runs once.
"""
import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

from . import ops
from .capture import copy_modes, eval_mode, finite, release_heap, run_captured
from .families import family_of
from .families.base import Family
from .macs import meta_copy
from .refit import DEFAULT_DAMP
from .report import SETTING_KEYS, PruneReport, Timer, make_recipe, measure
from .selection import FixedSelection, Selector
from .settings import PruneContext, PruneSettings
from .slicing import slice_into

__all__ = ['prune']


def prune(
        model: nn.Module,
        calib: Optional[torch.Tensor] = None,
        ratios: Union[float, dict, str, None] = None,
        *,
        preset: Optional[str] = None,
        selection=None,
        criteria: str = 'snp',
        qk_criterion: Optional[str] = None,
        v_criterion: Optional[str] = None,
        mlp_criterion: Optional[str] = None,
        embed_criterion: Optional[str] = None,
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
    """Prune a timm vision transformer with SNP; returns (a new, smaller model, a PruneReport).

    The original model is left untouched. Supported families: snp_fast.families.families() (timm
    VisionTransformer / Eva / RelPos, EfficientFormer V1).

    Args:
        model: a model of a supported family (vit_*, deit_*, deit3_*, *_distilled, eva*, efficientformer_l*, ...).
        calib: calibration images (B, C, H, W), preprocessed as for the model. Needed for the "snp"
            Q/K criterion, "activation" criteria, head pruning and the re-fit; 16-64 images are typical.
        ratios: fraction of dims REMOVED: a float (q/k, v, fc1 and embedding alike), a dict
            {'qk', 'v', 'mlp', 'heads', 'embed'} for every block, {'blocks': [...], 'embed'} per block, or a
            preset name (see snp_fast.list_presets()). 'heads' removes whole heads (then SNP inside the
            kept ones); 'drop_attn' / 'drop_mlp' (block indices, or a count chosen by branch_scores)
            remove whole attention / MLP branches (ViT family; see families/vit/widths.py). For
            EfficientFormer, 'embed' is the stage widths (a float or one ratio per stage).
        preset: a preset name (alternative to `ratios`).
        selection: instead of the criteria below, what to keep: a family Selection (exactly those indices; the
            target widths are its own, so no ratios), or a snp_fast.Selector whose scores(group) decide the
            groups it answers for (the criteria the rest). See snp_fast/selection.py.
        criteria: every group's criterion at once (the per-group arguments below, when given, still decide
            theirs): "snp" (the default: the paper's criteria), "magnitude" (every *_criterion "magnitude"),
            or "reconstruction" (FFN neurons, value filters and residual-stream channels by the least-squares
            error their consumers (fc2; attn.proj; every qkv, fc1 and the head) keep after the re-fit, greedy
            structured OBS with this `damp`; q/k pairs by the attention-logit error they leave; heads by
            `head_criterion`: snp_fast.criteria.Reconstruction; not with selection=; QUALITY.md compares).
        qk_criterion: "snp" (attention-score preservation) or "magnitude" (default: from `criteria`).
        v_criterion, mlp_criterion: "redundancy" (the paper's), "magnitude" or "activation".
        embed_criterion: "redundancy" (TSS-averaged over the stream's producers), "magnitude" or
            "activation" (ViT family).
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
        backend: the kernels to run, "auto" | "reference" | "compiled" | "triton": every op (Q/K scores,
            redundancy, Gram, slicing) takes this backend where it has one for the model's device and the
            fastest it has otherwise ("reference": the plain-PyTorch versions throughout). A backend with no
            kernel at all for that device is an error.
        precision: "fp32" (default) or "bf16": the precision of the large products, the redundancy cosines and
            the re-fit's Gram matrices. "bf16" rounds their inputs to bfloat16 (products summed in fp32; on a
            CPU with AMX / AVX512-BF16 several times faster): neighbouring scores may swap, and the selection
            can differ from the pure-Python version's, which "fp32" reproduces (ties aside).
        timm_name, timm_kwargs: how to rebuild the unpruned architecture with timm.create_model, for
            save_pruned/load_pruned (default: inferred from the model).
    """
    fixed = selection is not None and not isinstance(selection, Selector)
    if fixed and (ratios is not None or preset is not None):
        raise ValueError('selection=<a Selection> fixes the widths itself: give no ratios= or preset=')
    if not fixed and (ratios is None) == (preset is None):
        raise ValueError('give exactly one of ratios= or preset=')
    own = [k for k, c in (('v', v_criterion), ('mlp', mlp_criterion), ('embed', embed_criterion), ('qk', qk_criterion))
           if c is None]
    qk_criterion, v_criterion, mlp_criterion, embed_criterion = _apply_criteria(
        criteria, selection, qk_criterion, v_criterion, mlp_criterion, embed_criterion)
    settings = PruneSettings(qk_criterion, v_criterion, mlp_criterion, embed_criterion, head_criterion, gamma, refit,
                             damp, refit_tokens, batch_size, backend, precision)
    device = next(model.parameters(), torch.empty(0)).device
    settings.check(device)
    family = family_of(model)
    family.check_supported(model)
    family.check_settings(settings)
    if calib is None and (settings.refit or criteria == 'reconstruction' or not fixed and settings.needs_data()):
        raise ValueError('calibration images are needed (calib=...) for the re-fit, the "snp" Q/K criterion, head '
                         'pruning, "activation" criteria and criteria="reconstruction"; pass refit=False and '
                         'weight-only criteria to prune without data')
    if calib is not None:
        calib = _check_calib(family, model, calib).to(device=device, dtype=next(model.parameters()).dtype)
    if criteria == 'reconstruction':
        from .criteria import Reconstruction
        selection = Reconstruction(damp=damp, groups=own, calib=calib, batch=batch_size)  # (given criteria win)

    timer = Timer()
    ctx = PruneContext(model, calib, settings, family.model_dims(model), None, timer,
                       selector=FixedSelection(selection) if fixed else selection)
    if fixed:
        ctx.dims_after, spec = family.selection_dims(selection, ctx.dims_before), None
    else:
        mismatch = family.preset_mismatch(preset, ctx.dims_before) if preset is not None else None
        if mismatch:
            warnings.warn(mismatch, stacklevel=2)
            ctx.notes.append(mismatch)
        spec = family.resolve_ratios(preset if preset is not None else ratios, ctx.dims_before)
        spec = family.choose_drops(ctx, spec)
        ctx.dims_after = family.target_dims(ctx.dims_before, spec, ctx.notes)
    family.check_request(ctx)
    rebuild = family.rebuild_info(model, timm_name, timm_kwargs)
    rebuild['data_config'] = family.data_config(model)

    with eval_mode(model) as modes, ops.prefer(backend), ops.precision(precision):  # every op: `backend` where it has it
        pruned, kept = _run(family, ctx)
    copy_modes(pruned, modes)
    recorded = {'ratios': spec, 'preset': preset, **{k: getattr(settings, k) for k in SETTING_KEYS[1:]},
                'calib_images': 0 if calib is None else calib.shape[0], 'backend': backend, 'precision': precision}
    if criteria != 'snp':  # (recorded only when not the default: recipes of default runs stay as they were)
        recorded['criteria'] = criteria
    if selection is not None and criteria != 'reconstruction':
        recorded['selection'] = 'given' if fixed else type(selection).__name__
    pruned.snp_recipe = make_recipe(family.name, rebuild, ctx.dims_before, ctx.dims_after, kept, recorded)
    report = PruneReport(ctx.dims_before, ctx.dims_after, *measure(model, pruned), timer.times, recorded, ctx.stats,
                         ctx.notes, width_lines=family.width_lines)
    return pruned, report


_CRITERIA_DEFAULTS = {  # (qk, v, mlp, embed) per prune(criteria=...)
    'snp': ('snp', 'redundancy', 'redundancy', 'redundancy'),
    # the Selector decides; these where it has no answer (a group shape it does not know)
    'reconstruction': ('snp', 'redundancy', 'redundancy', 'redundancy'),
    'magnitude': ('magnitude',) * 4,
}


def _apply_criteria(criteria: str, selection, *given):
    """The per-group criteria for prune(criteria=...) (given ones win)."""
    if criteria not in _CRITERIA_DEFAULTS:
        raise ValueError(f'criteria={criteria!r} is not known; choose one of {list(_CRITERIA_DEFAULTS)}')
    if criteria == 'reconstruction' and selection is not None:
        raise ValueError('criteria="reconstruction" is itself a Selector: give no selection= with it')
    return tuple(g if g is not None else d for g, d in zip(given, _CRITERIA_DEFAULTS[criteria]))


def _check_calib(family: Family, model: nn.Module, calib) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor):
        raise TypeError(f'calib must be a float tensor of images (B, C, H, W), got {type(calib).__name__}')
    if calib.dim() != 4 or not calib.is_floating_point() or calib.shape[0] < 1:
        raise ValueError(f'calib must be a float tensor of images (B, C, H, W), got {calib.dtype} '
                         f'{tuple(calib.shape)}')
    c = getattr(model, 'in_chans', calib.shape[1])
    if calib.shape[1] != c:
        raise ValueError(f'calib has {calib.shape[1]} channels but the model takes {c}')
    family.check_calib(model, calib)
    if not torch.isfinite(calib).all():
        raise ValueError('calib contains NaN or Inf values')
    return calib


def _run(family: Family, ctx: PruneContext):
    """The one loop: stream selection, skeleton, then every step (capture, select, slice, re-fit), then the heads."""
    model, timer, batch = ctx.model, ctx.timer, ctx.batch
    with timer('selection'):
        stream = family.select_stream(ctx)
    with timer('rebuild'):
        pruned = family.apply_dims(meta_copy(model), ctx.dims_after)
    params, buffers = family.outer_names(model)
    with timer('slicing'):
        slice_into(pruned, model, family.outer_plan(model, stream), params, buffers)

    x = xp = None
    if ctx.calib is not None:
        with timer('calibration'):
            x = family.prefix(model, ctx.calib, batch)
        if ctx.refit:
            with timer('refit'):
                xp = family.prefix(pruned, ctx.calib, batch)
    kept = []
    for step in family.steps(ctx, pruned, stream):
        release_heap()  # what the step before freed: its run below is the peak, on top of the pruned blocks
        pre = step.preselect(ctx)
        cap = {}
        if x is not None:
            with timer('calibration'):
                x_next, cap = run_captured(step.original, x, step.taps(ctx, pre), batch, step.kwargs)
                step.after_capture(cap)
                finite(x_next, f'the output of {step.name} of the original model')
        sel = step.select(ctx, cap, pre)
        if sel is not None:
            kept.append(sel)
        with timer('slicing'):
            slice_into(pruned, model, step.plan(ctx, sel), step.params, step.buffers)
        if ctx.refit:
            with timer('refit'):
                xp = step.refit(ctx, x, xp, cap, sel)
        x = x_next if x is not None else None
        cap.clear()
    if ctx.refit:
        with timer('refit'):
            family.refit_head(ctx, pruned, x, xp, stream)
    leftover = [n for n, t in list(pruned.named_parameters()) + list(pruned.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f'internal error: tensors left unassigned after pruning: {leftover[:5]}')
    return pruned, family.make_selection(stream, kept)
