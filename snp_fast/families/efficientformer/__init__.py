"""SNP for timm EfficientFormer (V1): efficientformer_l1 / l3 / l7.

Paper: Y. Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", NeurIPS 2022
(arXiv 2206.01191). SNP prunes it in the SNP paper (EfficientFormer-L1 at 0.6 GMACs).

Structure (timm naming), and the groups this adapter builds from it (no tracing):
  stem           conv1+norm1 (C0/2, not pruned) -> conv2+norm2 (C0: the stage-0 width)
  stages.s       downsample (3x3 stride-2 conv + BatchNorm, stages 1..3) then blocks:
    MetaBlock2d  x + ls1*(avgpool(x) - x); x + ls2*norm2(fc2(act(norm1(fc1(x))))), fc1/fc2 1x1 convs
    Flat         (B, C, H, W) -> (B, HW, C), once, in the last stage
    MetaBlock1d  x + ls1*attn(norm1(x)); x + ls2*mlp(norm2(x)) (LayerNorm, timm Mlp), where attn's qkv
                 is laid out per head as [q (key_dim) | k (key_dim) | v (val_dim)], e.g. 32 | 32 | 128,
                 plus learned attention_biases (heads, 49) indexed by attention_bias_idxs (7x7 grid)
  norm, head, head_dist  (LayerNorm, two Linear classifiers averaged)

Groups (fraction removed set by the ratios):
  'qk'     q/k pairs of every head of every MetaBlock1d, by SNP's attention-score criterion on the
           captured q, k (ops.qk_scores); the ORIGINAL softmax scale is kept (timm's Attention reads
           self.scale, which is never recomputed).
  'v'      value filters per head (qkv rows, proj input columns), by redundancy.
  'heads'  whole heads of the attention (their q, k, v rows, proj columns and attention_biases row),
           by head_criterion as for ViTs (default "snp": each head's attention-score energy; "output":
           its output norm through proj on the calibration tokens); then SNP within the kept heads.
  'mlp'    hidden channels of every MLP: fc1 rows (+ its BatchNorm in Meta4D blocks) and fc2 columns.
  'embed'  the STAGE WIDTHS: one coupled group per stage, i.e. every tensor on that stage's residual
           path: the conv + BN producing it (stem conv2 / downsample), each block's fc2 (+BN) or proj
           output rows, fc1/qkv input columns, LayerScale gammas, LayerNorms, the next downsample's input
           channels, and for the last stage the final norm and both heads. A float removes that fraction
           of every stage's channels; a list gives one ratio per stage.

Re-fit (docs/METHOD.md, "The re-fit"), sequentially through the network on the calibration images: every
layer whose inputs changed is re-fit by least squares (refit.LinearFit) to the original layer's
output at the kept channels: downsample convs, qkv, proj, fc1, fc2 (1x1 convs and Linears) and the
two heads. A 1x1 conv is a Linear over pixels and a 3x3 downsample conv a Linear over unfolded 3x3
patches; both are fitted as Linears sharing the conv's storage. A conv followed by BatchNorm is fitted
to the original conv's output BEFORE the norm, and the (sliced) norm is kept: eval-mode BatchNorm is a
per-channel affine map, and least squares fits each output channel independently, so this equals
fitting the norm's output channel by channel while keeping the model a plain timm EfficientFormer.

Masked twins (tests): removed q/k dims <-> zeroed q and k rows; removed v dims, hidden channels or
heads <-> zeroed proj / fc2 input columns; removed channels of a Meta4D stage <-> zeroed fc1 and next
downsample input columns (those stages have no LayerNorm). The last stage's width has no twin.

    structure.py  what is supported; widths and selections     widths.py   ratio forms, presets
    surgery.py    slicing plans, the architecture change        steps.py    the pipeline hooks
"""
from typing import List

from ...capture import apply
from ...refit import refit_heads
from ...slicing import Plan
from ..base import Family, UnsupportedModelError
from ..registry import register_family
from .steps import select_stages, stage_scores, steps
from .structure import (SUPPORTED, EfficientFormerBlockDims, EfficientFormerBlockSelection, EfficientFormerDims,
                        EfficientFormerSelection, check_supported, is_attention_block, is_efficientformer, meta_blocks,
                        model_dims)
from .surgery import apply_dims, block_plan, qkv_rows, slice_plan, stem_and_head_plan
from .widths import RATIO_KEYS, preset_mismatch, resolve_ratios, target_dims

__all__ = ['EfficientFormerFamily', 'SUPPORTED', 'EfficientFormerDims', 'EfficientFormerBlockDims',
           'EfficientFormerSelection', 'EfficientFormerBlockSelection', 'UnsupportedModelError', 'is_efficientformer',
           'check_supported', 'model_dims', 'apply_dims', 'slice_plan', 'block_plan', 'stem_and_head_plan', 'qkv_rows',
           'resolve_ratios', 'target_dims', 'preset_mismatch', 'RATIO_KEYS', 'stage_scores']


class EfficientFormerFamily(Family):
    name = 'efficientformer'
    supported = SUPPORTED
    dims_type = EfficientFormerDims
    selection_type = EfficientFormerSelection
    # structure and widths: the folder's own functions
    check_supported = staticmethod(check_supported)
    model_dims = staticmethod(model_dims)
    apply_dims = staticmethod(apply_dims)
    target_dims = staticmethod(target_dims)
    preset_mismatch = staticmethod(preset_mismatch)
    slice_plan = staticmethod(slice_plan)

    def claims(self, model):
        return is_efficientformer(model)

    def resolve_ratios(self, spec, dims):
        return resolve_ratios(spec, dims)

    def selection_dims(self, selection, dims_before):
        return selection.dims(dims_before)

    def width_lines(self, before: EfficientFormerDims, after: EfficientFormerDims) -> List[str]:
        lines = [f'stage widths {before.stages} -> {after.stages}',
                 f'{"block":>20} {"heads":>8} {"q/k per head":>13} {"v per head":>11} {"mlp":>11}']
        for x, y in zip(before.blocks, after.blocks):
            att = f'{x.heads:>3} -> {y.heads:<2} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4}' if x.heads else ' ' * 35
            lines.append(f'{x.name:>20} {att} {x.mlp:>4} -> {y.mlp:<5}')
        return lines

    # --- pipeline hooks ----------------------------------------------------------------------------
    def check_settings(self, settings):
        if settings.refit == 'oneshot':
            raise ValueError('refit="oneshot" is available for the ViT family only; use refit=True (sequential)')
        if settings.embed_criterion == 'activation':
            raise ValueError('embed_criterion="activation" is not supported for EfficientFormer stage widths; use '
                             '"redundancy" or "magnitude"')

    def check_calib(self, model, calib):
        # the attention's biases are built for a fixed token grid (7x7 at 224x224): the input must map onto it
        n_convs = 2 + sum(hasattr(st.downsample, 'conv') for st in model.stages)
        grid = []
        for n in calib.shape[2:]:
            for _ in range(n_convs):
                n = (n - 1) // 2 + 1
            grid.append(n)
        tokens = next(b.token_mixer.attention_bias_idxs.shape[0] for _, _, b in meta_blocks(model)
                      if is_attention_block(b))
        if grid[0] * grid[1] != tokens:
            raise ValueError(f'calib images are {tuple(calib.shape[2:])}, which gives a {grid[0]}x{grid[1]} token '
                             f'grid, but this EfficientFormer\'s attention is built for {tokens} tokens (224x224 input)')

    def check_request(self, ctx):
        heads_pruned = any(a.heads != b.heads for a, b in zip(ctx.dims_after.blocks, ctx.dims_before.blocks))
        if ctx.calib is None and not ctx.fixed and heads_pruned:
            raise ValueError('calibration images are needed (calib=...) for the re-fit, the "snp" Q/K criterion, head '
                             'pruning and "activation" criteria; pass refit=False and weight-only criteria to prune '
                             'without data')

    def select_stream(self, ctx):
        return select_stages(ctx)

    def outer_plan(self, model, stream) -> Plan:
        return stem_and_head_plan(model, stream)

    def outer_names(self, model):
        outside = lambda n: '.blocks.' not in n  # noqa: E731
        return ([n for n, _ in model.named_parameters() if outside(n)],
                [n for n, _ in model.named_buffers() if outside(n)])

    def prefix(self, model, images, batch):
        return apply(model.stem, images, batch)

    def steps(self, ctx, pruned, stream):
        return steps(ctx, pruned, stream)

    def refit_head(self, ctx, pruned, x, xp, stream):
        s = ctx.settings
        refit_heads(ctx.model, pruned, x, xp, s.damp, s.refit_tokens, ctx.gen, ctx.batch, ctx.stats)

    def make_selection(self, stream, blocks):
        return EfficientFormerSelection(stream, blocks)


register_family(EfficientFormerFamily())
