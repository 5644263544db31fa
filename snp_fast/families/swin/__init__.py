"""SNP for timm Swin Transformer (V1): swin_* (SwinTransformer).

Paper: Z. Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021
(arXiv 2103.14030).

Structure (timm naming; hidden states NHWC (B, H, W, C) inside the stages), and the groups built from it:
  patch_embed    Conv2d proj (+ LayerNorm): produces stage 0's width
  layers.s       downsample (stages 1..: PatchMerging = the 2x2 neighbours' channels concatenated (4·C_{s-1}),
                 LayerNorm over them, Linear reduction without bias -> C_s), then SwinTransformerBlocks:
    block        x + attn(norm1(x)) over (shifted) windows; x + mlp(norm2(x)). WindowAttention: qkv laid out
                 [q | k | v] (head-major), a relative-position bias table (table rows, heads), scale 1/sqrt(d)
  norm, head.fc  LayerNorm over the last stage, then a ClassifierHead (pool, Linear)

Groups (fraction removed set by the ratios):
  'qk'     q/k pairs of every head of every block, by SNP's attention-score criterion on the captured q, k
           (ops.qk_scores), each WINDOW playing the role of an image (the shift mask is not part of Q Kᵀ); the
           bias table stays whole (it depends on neither width) and the ORIGINAL scale is kept.
  'v'      value filters per head (qkv rows, proj input columns), by redundancy.
  'heads'  whole heads (their q, k, v rows, proj columns and bias-table column), by head_criterion as for ViTs;
           then SNP within the kept heads.
  'mlp'    fc1 neurons (fc1 rows, fc2 columns), by redundancy.
  'embed'  the STAGE WIDTHS: one coupled group per stage: the patch embedding (stage 0) or PatchMerging's
           reduction rows (stage s) and its norm + input columns in the next stage (the kept channels four
           times, one per neighbour), each block's norms, qkv / fc1 input columns and proj / fc2 output rows,
           and for the last stage the final norm and the classifier's columns. A float removes that fraction of
           every stage's channels; a list gives one ratio per stage.

Re-fit (docs/METHOD.md, "The re-fit"), sequentially on the calibration images: each PatchMerging reduction,
then per block qkv, proj (window by window), fc1, fc2, and the classifier, each from the pruned model's own
inputs to the original layer's outputs at the kept rows.

Masked twins (tests): removed q/k dims <-> zeroed q and k rows; removed v dims, FFN neurons or heads <->
zeroed proj / fc2 input columns (and a removed head's q/k/v rows). Stage widths have no twin (LayerNorms).

Not supported: swinv2_* (SwinTransformerV2 / V2Cr: cosine attention with a learned logit scale, log-spaced
continuous position bias, residual post-norm; refused with that reason). No presets; `--flops` is ViT-only.

    structure.py  what is supported; widths and selections     widths.py   ratio forms
    layers.py     PrunedWindowAttention                         surgery.py  slicing plans, the architecture change
    steps.py      the pipeline hooks
"""
from typing import List

from ...slicing import Plan
from ..base import Family, UnsupportedModelError
from ..registry import register_family
from .layers import PrunedWindowAttention
from .steps import refit_head, select_stages, stage_scores, steps
from .structure import (SUPPORTED, SwinBlockDims, SwinBlockSelection, SwinDims, SwinSelection, check_supported,
                        claims_swin, is_swin, model_dims, swin_blocks)
from .surgery import apply_dims, block_plan, merged_cols, outer_plan, qkv_rows, slice_plan
from .widths import RATIO_KEYS, preset_mismatch, resolve_ratios, target_dims

__all__ = ['SwinFamily', 'SUPPORTED', 'SwinDims', 'SwinBlockDims', 'SwinSelection', 'SwinBlockSelection',
           'PrunedWindowAttention', 'UnsupportedModelError', 'is_swin', 'check_supported', 'model_dims', 'apply_dims',
           'slice_plan', 'block_plan', 'outer_plan', 'merged_cols', 'qkv_rows', 'resolve_ratios', 'target_dims',
           'preset_mismatch', 'RATIO_KEYS', 'stage_scores', 'swin_blocks']


class SwinFamily(Family):
    name = 'swin'
    supported = SUPPORTED
    dims_type = SwinDims
    selection_type = SwinSelection

    def claims(self, model):
        return claims_swin(model)

    def check_supported(self, model):
        check_supported(model)

    def model_dims(self, model):
        return model_dims(model)

    def apply_dims(self, model, dims):
        return apply_dims(model, dims)

    def resolve_ratios(self, spec, dims):
        return resolve_ratios(spec, dims)

    def target_dims(self, dims, ratios, notes):
        return target_dims(dims, ratios, notes)

    def preset_mismatch(self, name, dims):
        return preset_mismatch(name, dims)

    def slice_plan(self, model, selection):
        return slice_plan(model, selection)

    def selection_dims(self, selection, dims_before):
        return selection.dims(dims_before)

    def width_lines(self, before: SwinDims, after: SwinDims) -> List[str]:
        lines = [f'stage widths {before.stages} -> {after.stages}',
                 f'{"block":>17} {"heads":>8} {"q/k per head":>13} {"v per head":>11} {"mlp":>11}']
        for x, y in zip(before.blocks, after.blocks):
            lines.append(f'{x.name:>17} {x.heads:>3} -> {y.heads:<2} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4} '
                         f'{x.mlp:>4} -> {y.mlp:<5}')
        return lines

    # --- pipeline hooks ----------------------------------------------------------------------------
    def check_settings(self, settings):
        if settings.refit == 'oneshot':
            raise ValueError('refit="oneshot" is available for the ViT family only; use refit=True (sequential)')
        if settings.embed_criterion == 'activation':
            raise ValueError('embed_criterion="activation" is not supported for Swin stage widths; use "redundancy" '
                             'or "magnitude"')

    def check_calib(self, model, calib):
        img = tuple(model.patch_embed.img_size or calib.shape[2:])
        if not model.dynamic_img_size and tuple(calib.shape[2:]) != img:
            raise ValueError(f'calib images are {tuple(calib.shape[2:])} but the model takes {img}')

    def check_request(self, ctx):
        if ctx.calib is None and any(a.heads != b.heads for a, b in zip(ctx.dims_after.blocks, ctx.dims_before.blocks)):
            raise ValueError('head pruning ("heads" ratios) scores the heads on calibration images; pass calib=')

    def select_stream(self, ctx):
        return select_stages(ctx)

    def outer_plan(self, model, stream) -> Plan:
        return outer_plan(model, stream)

    def outer_names(self, model):
        outside = lambda n: '.blocks.' not in n  # noqa: E731
        return ([n for n, _ in model.named_parameters() if outside(n)],
                [n for n, _ in model.named_buffers() if outside(n)])

    def prefix(self, model, images, batch):
        from ...capture import apply
        return apply(model.patch_embed, images, batch)

    def steps(self, ctx, pruned, stream):
        return steps(ctx, pruned, stream)

    def refit_head(self, ctx, pruned, x, xp, stream):
        refit_head(ctx, pruned, x, xp)

    def make_selection(self, stream, blocks):
        return SwinSelection(stream, blocks)


register_family(SwinFamily())
