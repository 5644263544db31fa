"""Swin's pipeline hooks: the stage-width selection, and the steps of the loop in network order: each stage's
PatchMerging (stages 1..; re-fitted: its reduction), then its blocks (selected, sliced, re-fitted: qkv, proj,
fc1, fc2), then the classifier's re-fit.

Hidden states are NHWC (B, H, W, C) between blocks, as in timm. Inside a block the attention runs on windows
(B·windows, N, C): its captures (qkv, proj) are per window and its re-fit pairs the pruned and original
attentions window by window (the same partition and shift, since the grid does not change)."""
from typing import List

import torch
import torch.nn as nn

from ... import ops
from ...capture import Call, apply, chunks, finite, run_captured, token_subset
from ...refit import fit
from ...scores import head_energy, head_output, qk_magnitude, tss_average
from ...selection import Group, choose
from ...settings import PruneContext
from ..base import Step
from .structure import SwinBlockSelection, attn_dims, swin_blocks
from .surgery import block_plan, head_rows, qkv_rows

__all__ = ['stage_scores', 'select_stages', 'MergeStep', 'BlockStep', 'steps', 'refit_head']


# ------------------------------------------------------------------------------------------------
# stage widths (the residual streams)

def _rows(w: torch.Tensor, gain=None) -> torch.Tensor:
    w = w.detach().flatten(1).float()
    return w if gain is None else w * gain.detach().float().unsqueeze(1)


def stage_scores(ctx: PruneContext, s: int) -> torch.Tensor:
    """Scores of stage s's channels: each producer of the stage's residual stream (the patch embedding, with its
    norm's gain, or PatchMerging's reduction; every block's attn.proj and mlp.fc2) scored by the embed criterion
    on its output rows, total-sum scaled, averaged."""
    model = ctx.model
    if s == 0:
        pe = model.patch_embed
        producers = [_rows(pe.proj.weight, getattr(pe.norm, 'weight', None))]
    else:
        producers = [_rows(model.layers[s].downsample.reduction.weight)]
    for b in model.layers[s].blocks:
        producers += [_rows(b.attn.proj.weight), _rows(b.mlp.fc2.weight)]
    return tss_average([ctx.row_scores(w, ctx.settings.embed_criterion) for w in producers])


def select_stages(ctx: PruneContext) -> List[torch.Tensor]:
    """The kept channels of every stage, from the weights, up front: every block of a stage shares them."""
    widths = ctx.dims_before.stages
    return [torch.arange(c) if c == widths[s] else
            choose(ctx.selector, Group('embed', f'layers.{s}', c, (widths[s],), ctx.model, stage=s),
                   lambda s=s: stage_scores(ctx, s))
            for s, c in enumerate(ctx.dims_after.stages)]


def _rows_of(t: torch.Tensor, ctx: PruneContext):
    return token_subset(t.shape[:-1].numel(), ctx.settings.refit_tokens, ctx.gen)


# ------------------------------------------------------------------------------------------------
# the steps

class MergeStep(Step):
    """Stage s's PatchMerging: sliced with the stem and head (it only couples stage widths s-1 -> s); its
    reduction is re-fitted from the pruned model's own merged neighbours."""

    def __init__(self, original: nn.Module, pruned: nn.Module, s: int, kept: torch.Tensor):
        self.original, self.pruned, self.s, self.kept = original, pruned, s, kept
        self.name = f'layers.{s}.downsample'

    def taps(self, ctx, pre):
        red = self.original.reduction
        return {'out': (red, 'out', self.kept.to(red.weight.device))} if ctx.refit else {}

    def refit(self, ctx, x, xp, cap, sel):
        red = self.pruned.reduction
        _, c = run_captured(self.pruned, xp, {'in': (red, 'in'), 'pred': (red, 'out')}, ctx.batch)
        ctx.stats[f'{self.name}.reduction'] = fit(red, c['in'], cap['out'], _rows_of(cap['out'], ctx),
                                                  ctx.settings.damp, c['pred'])
        del c
        return finite(apply(self.pruned, xp, ctx.batch), f'the output of {self.name} of the pruned model')


class BlockStep(Step):
    """A SwinTransformerBlock: select (heads, q/k per window attention, v, FFN), slice, re-fit."""

    def __init__(self, ctx: PruneContext, pruned: nn.Module, name: str, index: int, kept: torch.Tensor):
        self.name, self.index, self.kept = name, index, kept
        self.original, self.pruned = ctx.model.get_submodule(name), pruned.get_submodule(name)
        self.bd, self.od = ctx.dims_after.blocks[index], ctx.dims_before.blocks[index]
        self.params = [n for n, _ in ctx.model.named_parameters() if n.startswith(name + '.')]
        self.buffers = [n for n, _ in ctx.model.named_buffers() if n.startswith(name + '.')]

    def taps(self, ctx, pre):
        a, m = self.original.attn, self.original.mlp
        taps = {'qkv': (a.qkv, 'out')}
        if ctx.refit:
            e = self.kept.to(a.proj.weight.device)
            taps.update(proj_out=(a.proj, 'out', e), fc1=(m.fc1, 'out'), fc2_out=(m.fc2, 'out', e))
        if self.bd.mlp < self.od.mlp and (ctx.settings.mlp_criterion == 'activation' or ctx.wants('fc2_in')):
            taps['fc2_in'] = (m.fc2, 'in')
        if (ctx.settings.head_criterion == 'output' and self.bd.heads < self.od.heads) or ctx.wants('proj_in'):
            taps['proj_in'] = (a.proj, 'in')
        return taps

    def _group(self, kind, keep, shape, cap, heads=None) -> Group:
        return Group(kind, self.name, keep, tuple(shape), self.original, block=self.index, captured=cap, heads=heads)

    def select(self, ctx: PruneContext, cap: dict, pre) -> SwinBlockSelection:
        with ctx.timer('selection'):
            return self._select(ctx, cap)

    def _select(self, ctx: PruneContext, cap: dict) -> SwinBlockSelection:
        """Kept FFN neurons, heads, q/k pairs per kept head (SNP's criterion with every window an image) and
        v dims per kept head."""
        ob, bd, s = self.original, self.bd, ctx.settings
        a, m = ob.attn, ob.mlp
        H, d, _ = attn_dims(a)
        if bd.mlp == m.fc1.out_features:
            mlp = torch.arange(bd.mlp)
        else:
            act = (lambda: cap['fc2_in'].float().pow(2).flatten(0, -2).sum(0)) if s.mlp_criterion == 'activation' \
                else (lambda: None)
            mlp = choose(ctx.selector, self._group('mlp', bd.mlp, (m.fc1.out_features,), cap),
                         lambda: ctx.row_scores(m.fc1.weight, s.mlp_criterion, act()))
        qkv = cap.get('qkv')  # (windows, N, 3·H·d), or None without calibration images

        def qk_of(heads):  # q, k of those heads as (windows, H', N, d): the windows are the "images"
            t = qkv.view(*qkv.shape[:2], 3, H, d)[:, :, :2, heads].permute(2, 0, 3, 1, 4)
            return t[0], t[1]
        if bd.heads == H:
            heads = torch.arange(H)
        else:
            def heads_default():
                if s.head_criterion == 'output':
                    return head_output(cap['proj_in'], a.proj.weight, H)
                q, k = qk_of(torch.arange(H))
                return sum(head_energy(qc, kc, s.gamma or bd.qk)
                           for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
            heads = choose(ctx.selector, self._group('heads', bd.heads, (H,), cap), heads_default)
        if bd.qk == d:
            qk = torch.arange(d).expand(len(heads), d).clone()
        else:
            def qk_default():
                if s.qk_criterion == 'snp':
                    q, k = qk_of(heads)
                    return sum(ops.qk_scores(qc, kc, s.gamma or bd.qk)
                               for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
                return qk_magnitude(a.qkv.weight, H, d)[heads]
            with ctx.timer('qk_scoring'):
                qk = choose(ctx.selector, self._group('qk', bd.qk, (len(heads), d), cap, heads), qk_default)
        if bd.v == d:
            v = torch.arange(d).expand(len(heads), d).clone()
        else:
            def v_default():
                rows = head_rows(torch.arange(d).expand(len(heads), d), heads, d, 2 * H * d)
                act = (qkv[..., rows.to(qkv.device)].float().pow(2).flatten(0, -2).sum(0)
                       if s.v_criterion == 'activation' else None)
                return ctx.row_scores(a.qkv.weight[rows], s.v_criterion, act).view(len(heads), d)
            v = choose(ctx.selector, self._group('v', bd.v, (len(heads), d), cap, heads), v_default)
        return SwinBlockSelection(mlp, heads, qk, v)

    def plan(self, ctx, sel):
        return block_plan(self.original, self.name, sel, self.kept)

    @torch.no_grad()
    def refit(self, ctx, x, xp, cap, sel):
        """Sequential re-fit of one pruned block: qkv, proj, fc1, fc2, each from the pruned model's own inputs to
        the original layer's outputs at the kept rows (attention layers window by window)."""
        pb, name, batch, damp, stats = self.pruned, self.name, ctx.batch, ctx.settings.damp, ctx.stats
        H, d, _ = attn_dims(self.original.attn)
        a = pb.attn
        n1 = apply(pb.norm1, xp, batch)
        attn_branch = Call(pb._attn)  # shift, partition, attention, merge, unshift
        _, c = run_captured(attn_branch, n1, {'win': (a, 'in')}, batch)
        target = cap.pop('qkv')[..., qkv_rows(sel, H, d).to(xp.device)]
        stats[f'{name}.attn.qkv'] = fit(a.qkv, c['win'], target, _rows_of(target, ctx), damp)
        del c, target
        _, c = run_captured(attn_branch, n1, {'ctx': (a.proj, 'in'), 'pred': (a.proj, 'out')}, batch)
        target = cap.pop('proj_out')
        stats[f'{name}.attn.proj'] = fit(a.proj, c['ctx'], target, _rows_of(target, ctx), damp, c['pred'])
        del c, target, n1
        mid = apply(lambda t: t + pb.drop_path1(pb._attn(pb.norm1(t))), xp, batch)
        n2 = apply(pb.norm2, mid.flatten(1, 2), batch)
        m = pb.mlp
        target = cap.pop('fc1')[..., sel.mlp.to(xp.device)]
        stats[f'{name}.mlp.fc1'] = fit(m.fc1, n2, target, _rows_of(target, ctx), damp)
        del target
        _, c = run_captured(m, n2, {'hidden': (m.fc2, 'in'), 'pred': (m.fc2, 'out')}, batch)
        target = cap.pop('fc2_out')
        stats[f'{name}.mlp.fc2'] = fit(m.fc2, c['hidden'], target, _rows_of(target, ctx), damp, c['pred'])
        del c, target, n2, mid
        return finite(apply(pb, xp, batch), f'the output of {name} of the pruned model')


def steps(ctx: PruneContext, pruned: nn.Module, stages: List[torch.Tensor]) -> List[Step]:
    """The loop's steps in network order: per stage its PatchMerging (stages 1..), then its blocks."""
    out: List[Step] = []
    blocks = list(swin_blocks(ctx.model))
    for s, (ost, pst) in enumerate(zip(ctx.model.layers, pruned.layers)):
        if s > 0:
            out.append(MergeStep(ost.downsample, pst.downsample, s, stages[s]))
        out += [BlockStep(ctx, pruned, name, i, stages[s]) for i, (name, bs, _) in enumerate(blocks) if bs == s]
    return out


@torch.no_grad()
def refit_head(ctx: PruneContext, pruned: nn.Module, x: torch.Tensor, xp: torch.Tensor) -> None:
    """Re-fit the classifier (head.fc) from the pruned model's pooled features to the original logits."""
    head = lambda m: Call(lambda t: m.forward_head(m.norm(t)))  # noqa: E731
    _, orig = run_captured(head(ctx.model), x, {'fc': (ctx.model.head.fc, 'out')}, ctx.batch)
    _, new = run_captured(head(pruned), xp, {'fc': (pruned.head.fc, 'in')}, ctx.batch)
    ctx.stats['head.fc'] = fit(pruned.head.fc, new['fc'], orig['fc'], _rows_of(orig['fc'], ctx), ctx.settings.damp)
