"""The ViT family: timm VisionTransformer (ViT, DeiT, distilled DeiT, DeiT-3, register tokens),
VisionTransformerRelPos and Eva (EVA-02, DINOv3, RoPE-ViT, PE).

Groups (docs/METHOD.md): per block a query/key group, a value group, an FFN group and optionally whole
heads or a whole branch; one residual-stream (embedding) group couples every tensor reading or writing
the stream.

    structure.py  what is supported; widths (ModelDims) and selections (Selection)
    widths.py     ratio forms -> target widths, presets
    layers.py     PrunedAttention (q/k width != v width, original scale kept); roles.py: per-layout roles
    surgery.py    slicing plans and the architecture change on a meta-device copy
    steps.py      the pipeline hooks: prefix, stream selection, one Step per block, the heads' re-fit
    branches.py   whole-branch scores for drop counts
"""
from typing import List

from ...slicing import Plan
from ..base import Family, UnsupportedModelError
from ..registry import register_family
from ..uniform import width_lines
from . import roles
from .branches import BRANCH_CRITERIA, branch_scores, choose_dropped
from .layers import PrunedAttention, PrunedRelPosAttention
from ...refit import refit_heads
from .steps import BlockStep, block_kwargs, prefix, select_embed
from .structure import (SUPPORTED, BlockDims, BlockSelection, ModelDims, Selection, check_supported, fixed_qk_reason,
                        has_qk_norm, is_eva, is_vit, model_dims)
from .surgery import apply_dims, block_plan, head_rows, slice_plan, stem_and_head_plan, value_out_cols
from .widths import DROP_KEYS, RATIO_KEYS, preset_mismatch, resolve_ratios, target_dims

__all__ = ['ViTFamily', 'SUPPORTED', 'BlockDims', 'ModelDims', 'BlockSelection', 'Selection', 'PrunedAttention',
           'PrunedRelPosAttention', 'UnsupportedModelError', 'check_supported', 'model_dims', 'apply_dims',
           'slice_plan', 'block_plan', 'stem_and_head_plan', 'head_rows', 'value_out_cols', 'fixed_qk_reason',
           'has_qk_norm', 'is_eva', 'resolve_ratios', 'target_dims', 'preset_mismatch', 'DROP_KEYS', 'RATIO_KEYS',
           'branch_scores', 'BRANCH_CRITERIA', 'roles']


class ViTFamily(Family):
    name = 'vit'
    supported = SUPPORTED
    dims_type = ModelDims
    selection_type = Selection
    # structure and widths: the folder's own functions
    check_supported = staticmethod(check_supported)
    model_dims = staticmethod(model_dims)
    apply_dims = staticmethod(apply_dims)
    target_dims = staticmethod(target_dims)
    preset_mismatch = staticmethod(preset_mismatch)
    slice_plan = staticmethod(slice_plan)

    def claims(self, model):
        return is_vit(model)

    def resolve_ratios(self, spec, dims):
        return resolve_ratios(spec, len(dims.blocks))

    def width_lines(self, before: ModelDims, after: ModelDims) -> List[str]:
        return width_lines(before, after)

    # --- pipeline hooks ----------------------------------------------------------------------------
    def check_calib(self, model, calib):
        img = tuple(getattr(model.patch_embed, 'img_size', None) or calib.shape[2:])
        if not getattr(model, 'dynamic_img_size', False) and tuple(calib.shape[2:]) != img:
            raise ValueError(f'calib images are {tuple(calib.shape[2:])} but the model takes {img}')

    def choose_drops(self, ctx, ratios):
        if any(isinstance(ratios[k], int) and ratios[k] for k in DROP_KEYS):  # counts: the least contributing branches
            if ctx.calib is None:
                raise ValueError('ratios drop_attn / drop_mlp given as a number of blocks need calibration images '
                                 '(calib=) to score the branches; give block indices to drop without data')
            with ctx.timer('selection'):
                ratios = choose_dropped(ctx.model, ctx.calib, ratios, ctx.batch, ctx.notes)
        return ratios

    def check_request(self, ctx):
        pairs = list(zip(ctx.dims_after.blocks, ctx.dims_before.blocks))
        if ctx.calib is None and not ctx.fixed and any(0 < a.heads < b.heads for a, b in pairs):
            raise ValueError('head pruning ("heads" ratios) scores the heads on calibration images; pass calib=')
        fixed_qk = fixed_qk_reason(ctx.model)
        if fixed_qk and any(a.heads and a.qk != b.qk for a, b in pairs):
            raise ValueError(f'{fixed_qk}, so q/k dims cannot be pruned; set the qk ratios to 0 (v, fc1 and embedding '
                             'pruning remain available)')

    def select_stream(self, ctx):
        return select_embed(ctx)

    def outer_plan(self, model, stream) -> Plan:
        return stem_and_head_plan(model, stream)

    def outer_names(self, model):
        # every buffer is copied as it is (none is pruned: RoPE tables, relative-position indices)
        return ([n for n, _ in model.named_parameters() if not n.startswith('blocks.')],
                [n for n, _ in model.named_buffers()])

    def prefix(self, model, images, batch):
        return prefix(model, images, batch)

    def steps(self, ctx, pruned, stream):
        kws = block_kwargs(ctx.model, ctx.calib)
        return [BlockStep(ctx, pruned, i, stream, kws[i]) for i in range(len(ctx.model.blocks))]

    def refit_head(self, ctx, pruned, x, xp, stream):
        s = ctx.settings
        refit_heads(ctx.model, pruned, x, xp, s.damp, s.refit_tokens, ctx.gen, ctx.batch, ctx.stats)

    def make_selection(self, stream, blocks):
        return Selection(stream, blocks)


register_family(ViTFamily())
