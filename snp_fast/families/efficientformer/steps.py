"""EfficientFormer's pipeline hooks: the stage-width selection, and the steps of the loop in network order:
each stage's downsample (re-fitted as a Linear over unfolded 3x3 patches), its MetaBlocks (selected, sliced,
re-fitted: (qkv, proj,) fc1, fc2), and the Flat reshape (only run).

A conv followed by BatchNorm is fitted to the original conv's output BEFORE the norm, and the (sliced) norm is
kept: eval-mode BatchNorm is a per-channel affine map and least squares fits each output channel independently,
so this equals fitting the norm's output channel by channel while keeping the model a plain timm EfficientFormer.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import ops
from ...capture import apply, chunks, finite, run_captured, token_subset
from ...refit import fit
from ...scores import head_energy, head_output, tss_average
from ...selection import Group, choose
from ...settings import PruneContext
from ..base import Step
from .structure import EfficientFormerBlockSelection, is_attention_block, meta_blocks
from .surgery import block_plan, qkv_rows

__all__ = ['select_stages', 'steps', 'stage_scores']


# ------------------------------------------------------------------------------------------------
# stage widths (the residual streams)

def _scaled_rows(layer: nn.Module, *scales: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's weight rows (flattened) times per-output-channel scales that follow it (BN, LayerScale)."""
    w = layer.weight.detach().flatten(1).float()
    for s in scales:
        if s is not None:
            w = w * s.detach().float().unsqueeze(1)
    return w


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn.weight / (bn.running_var + bn.eps).sqrt()


def stage_scores(ctx: PruneContext, s: int) -> torch.Tensor:
    """Scores of stage s's channels: each producer of the stage's residual stream scored by the embed criterion
    on its effective output rows (BN and LayerScale folded in), total-sum scaled, averaged."""
    model = ctx.model
    stage = model.stages[s]
    first = (model.stem.conv2, model.stem.norm2) if s == 0 else (stage.downsample.conv, stage.downsample.norm)
    producers = [_scaled_rows(first[0], _bn_scale(first[1]))]
    for b in stage.blocks:
        if is_attention_block(b):
            producers += [_scaled_rows(b.token_mixer.proj, b.ls1.gamma), _scaled_rows(b.mlp.fc2, b.ls2.gamma)]
        elif hasattr(b, 'mlp'):
            producers.append(_scaled_rows(b.mlp.fc2, _bn_scale(b.mlp.norm2), b.ls2.gamma))
    return tss_average([ctx.row_scores(w, ctx.settings.embed_criterion) for w in producers])


def select_stages(ctx: PruneContext) -> List[torch.Tensor]:
    """The kept channels of every stage, from the weights, up front: every block of a stage shares them."""
    widths = ctx.dims_before.stages
    return [torch.arange(c) if c == widths[s] else
            choose(ctx.selector, Group('embed', f'stages.{s}', c, (widths[s],), ctx.model, stage=s),
                   lambda s=s: stage_scores(ctx, s))
            for s, c in enumerate(ctx.dims_after.stages)]


# ------------------------------------------------------------------------------------------------
# the steps

def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


def _as_linear(conv: nn.Conv2d) -> nn.Linear:
    """A Linear over (unfolded) pixels sharing the conv's weight and bias storage: re-fitting it re-fits the conv."""
    lin = nn.Linear(1, 1, bias=conv.bias is not None, device='meta')
    lin.in_features, lin.out_features = conv.weight[0].numel(), conv.out_channels
    lin.weight = nn.Parameter(conv.weight.detach().view(conv.out_channels, -1), requires_grad=False)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return lin


def _unfold(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, pixels, C·kh·kw): the conv's input patches, in the order of weight.view(out, -1)."""
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)


class DownsampleStep(Step):
    """Stage s's downsample (conv + BatchNorm): sliced with the stem and head (it only couples stage widths);
    its conv is re-fitted from the pruned model's own inputs."""

    def __init__(self, original: nn.Module, pruned: nn.Module, s: int, kept: torch.Tensor):
        self.original, self.pruned, self.s, self.kept = original, pruned, s, kept
        self.name = f'stages.{s}.downsample'

    def taps(self, ctx, pre):
        return {'conv': (self.original.conv, 'out')}

    def refit(self, ctx, x, xp, cap, sel):
        conv = self.pruned.conv
        patches = apply(lambda t: _unfold(conv, t), xp, ctx.batch)
        target = cap['conv'].flatten(2).transpose(1, 2)[..., self.kept.to(xp.device)]
        rows = token_subset(patches.shape[0] * patches.shape[1], ctx.settings.refit_tokens, ctx.gen)
        ctx.stats[f'{self.name}.conv'] = fit(_as_linear(conv), patches, target, rows, ctx.settings.damp)
        del patches, target
        return apply(self.pruned, xp, ctx.batch)


class RunStep(Step):
    """A module with no parameters of its own (timm's Flat): only run, on both models."""

    def __init__(self, original: nn.Module, pruned: nn.Module, name: str):
        self.original, self.pruned, self.name = original, pruned, name

    def refit(self, ctx, x, xp, cap, sel):
        return apply(self.pruned, xp, ctx.batch)


class MetaBlockStep(Step):
    """A MetaBlock2d (pooling mixer, conv MLP) or MetaBlock1d (attention, Linear MLP): select, slice, re-fit."""

    def __init__(self, ctx: PruneContext, pruned: nn.Module, name: str, index: int, kept: torch.Tensor):
        self.name, self.index, self.kept = name, index, kept
        self.original, self.pruned = ctx.model.get_submodule(name), pruned.get_submodule(name)
        self.bd = ctx.dims_after.blocks[index]
        self.params = [n for n, _ in ctx.model.named_parameters() if n.startswith(name + '.')]
        self.buffers = [n for n, _ in ctx.model.named_buffers() if n.startswith(name + '.')]

    def taps(self, ctx, pre):
        m = self.original.mlp
        taps = {'fc1': (m.fc1, 'out'), 'fc2_in': (m.fc2, 'in'), 'fc2_out': (m.fc2, 'out')}
        if is_attention_block(self.original):
            a = self.original.token_mixer
            taps.update(qkv=(a.qkv, 'out'), ctx=(a.proj, 'in'), proj_out=(a.proj, 'out'))
        return taps

    def _group(self, kind, keep, shape, cap, heads=None) -> Group:
        return Group(kind, self.name, keep, tuple(shape), self.original, block=self.index, captured=cap, heads=heads)

    def select(self, ctx: PruneContext, cap: dict, pre) -> EfficientFormerBlockSelection:
        with ctx.timer('selection'):
            return self._select(ctx, cap)

    def _select(self, ctx: PruneContext, cap: dict) -> EfficientFormerBlockSelection:
        """Kept MLP channels, and for attention blocks kept heads, q/k pairs (per kept head) and v dims."""
        ob, bd, s = self.original, self.bd, ctx.settings
        m = ob.mlp
        n_hidden = m.fc1.weight.shape[0]
        attn_block = is_attention_block(ob)
        if bd.mlp == n_hidden:
            mlp = torch.arange(n_hidden)
        else:
            def mlp_default():
                w = _scaled_rows(m.fc1, None if attn_block else _bn_scale(m.norm1))
                act = (_nhwc(cap['fc2_in']).float().pow(2).flatten(0, -2).sum(0)
                       if s.mlp_criterion == 'activation' else None)
                return ctx.row_scores(w, s.mlp_criterion, act)
            mlp = choose(ctx.selector, self._group('mlp', bd.mlp, (n_hidden,), cap), mlp_default)
        if not attn_block:
            return EfficientFormerBlockSelection(mlp)
        a = ob.token_mixer
        H, kd, vd = a.num_heads, a.key_dim, a.val_dim
        qkv = cap['qkv'].view(*cap['qkv'].shape[:2], H, 2 * kd + vd).transpose(1, 2) if cap else None  # (B, H, N, .)
        if bd.heads == H:
            heads = torch.arange(H)
        else:
            def heads_default():
                if s.head_criterion == 'output':
                    return head_output(cap['ctx'], a.proj.weight, H)
                return sum(head_energy(qc[..., :kd], qc[..., kd:2 * kd], s.gamma or bd.qk)
                           for qc in chunks(qkv, ctx.batch))
            heads = choose(ctx.selector, self._group('heads', bd.heads, (H,), cap), heads_default)
        w = a.qkv.weight.detach().view(H, 2 * kd + vd, -1)[heads]
        if qkv is not None:
            qkv = qkv[:, heads.to(qkv.device)]
        if bd.qk == kd:
            qk = torch.arange(kd).expand(len(heads), kd).clone()
        else:
            def qk_default():
                if s.qk_criterion == 'snp':
                    q, k = qkv[..., :kd], qkv[..., kd:2 * kd]
                    return sum(ops.qk_scores(qc, kc, s.gamma or bd.qk)
                               for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
                return w[:, :kd].float().norm(dim=2) * w[:, kd:2 * kd].float().norm(dim=2)
            with ctx.timer('qk_scoring'):
                qk = choose(ctx.selector, self._group('qk', bd.qk, (len(heads), kd), cap, heads), qk_default)
        if bd.v == vd:
            v = torch.arange(vd).expand(len(heads), vd).clone()
        else:
            def v_default():
                act = qkv[..., 2 * kd:].float().pow(2).sum(dim=(0, 2)).flatten() if s.v_criterion == 'activation' \
                    else None
                return ctx.row_scores(w[:, 2 * kd:].flatten(0, 1), s.v_criterion, act).view(len(heads), vd)
            v = choose(ctx.selector, self._group('v', bd.v, (len(heads), vd), cap, heads), v_default)
        return EfficientFormerBlockSelection(mlp, heads, qk, v)

    def plan(self, ctx, sel):
        return block_plan(self.original, self.name, sel, self.kept)

    @torch.no_grad()
    def refit(self, ctx, x, xp, cap, sel):
        """Sequential re-fit of one pruned MetaBlock: (qkv, proj,) fc1, fc2, each from the pruned model's own
        inputs to the original layer's outputs at the kept channels (conv outputs before their BatchNorm)."""
        ob, pb, name, batch, damp, stats = self.original, self.pruned, self.name, ctx.batch, ctx.settings.damp, ctx.stats
        dev = xp.device
        e = self.kept.to(dev)
        pixels = xp.shape[0] * math.prod(xp.shape[2:]) if xp.dim() == 4 else xp.shape[0] * xp.shape[1]
        rows = token_subset(pixels, ctx.settings.refit_tokens, ctx.gen)
        m = pb.mlp
        attn_block = is_attention_block(pb)
        lin = (lambda c: c) if attn_block else _as_linear
        if attn_block:
            a, oa = pb.token_mixer, ob.token_mixer
            n1 = apply(pb.norm1, xp, batch)
            target = cap['qkv'][..., qkv_rows(sel, oa.key_dim, oa.val_dim).to(dev)]
            stats[f'{name}.token_mixer.qkv'] = fit(a.qkv, n1, target, rows, damp)
            _, c = run_captured(a, n1, {'ctx': (a.proj, 'in'), 'pred': (a.proj, 'out')}, batch)
            stats[f'{name}.token_mixer.proj'] = fit(a.proj, c['ctx'], cap['proj_out'][..., e], rows, damp, c['pred'])
            del n1, c
            mid = apply(lambda t: t + pb.ls1(pb.token_mixer(pb.norm1(t))), xp, batch)
            mlp_in = apply(pb.norm2, mid, batch)
        else:
            mlp_in = apply(lambda t: t + pb.ls1(pb.token_mixer(t)), xp, batch)
        stats[f'{name}.mlp.fc1'] = fit(lin(m.fc1), _nhwc(mlp_in), _nhwc(cap['fc1'])[..., sel.mlp.to(dev)], rows, damp)
        _, c = run_captured(m, mlp_in, {'hidden': (m.fc2, 'in'), 'pred': (m.fc2, 'out')}, batch)
        stats[f'{name}.mlp.fc2'] = fit(lin(m.fc2), _nhwc(c['hidden']), _nhwc(cap['fc2_out'])[..., e], rows, damp,
                                       _nhwc(c['pred']))
        del mlp_in, c
        return finite(apply(pb, xp, batch), f'the output of {name} of the pruned model')


def steps(ctx: PruneContext, pruned: nn.Module, stages: List[torch.Tensor]) -> List[Step]:
    """The loop's steps in network order: per stage its downsample (if any), then its blocks."""
    index = {name: i for i, (name, _, _) in enumerate(meta_blocks(ctx.model))}
    out: List[Step] = []
    for s, (ost, pst) in enumerate(zip(ctx.model.stages, pruned.stages)):
        if hasattr(ost.downsample, 'conv'):
            out.append(DownsampleStep(ost.downsample, pst.downsample, s, stages[s]))
        for j, (ob, pb) in enumerate(zip(ost.blocks, pst.blocks)):
            name = f'stages.{s}.blocks.{j}'
            out.append(MetaBlockStep(ctx, pruned, name, index[name], stages[s]) if name in index
                       else RunStep(ob, pb, name))
    return out
