"""The Hugging Face family's pipeline hooks: the embeddings as the prefix, the stream selection, one Step per
layer (taps, heads / q/k / v / FFN selection, slices, the sequential re-fit of q_proj, k_proj, v_proj, o_proj,
fc1, fc2) and the classifiers' re-fit (docs/METHOD.md)."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ... import ops
from ...capture import Call, apply, chunks, finite, run_captured, take_cols, token_subset
from ...refit import fit
from ...scores import head_energy, head_output, tss_average
from ...selection import Group, choose
from ...settings import PruneContext
from ...slicing import head_rows
from ..base import Step
from ..uniform import BlockSelection
from .structure import backbone_name, head_names, layers, layers_name, norm_names
from .surgery import block_plan

__all__ = ['prefix', 'select_embed', 'LayerStep', 'refit_heads']


def _backbone(model: nn.Module) -> nn.Module:
    return model.get_submodule(backbone_name(model))


@torch.no_grad()
def prefix(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Hidden states entering the first layer (patch + token + position embeddings)."""
    return apply(_backbone(model).embeddings, images, batch)


def _branch_scale(layer: nn.Module, i: int):
    ls = getattr(layer, f'layer_scale{i}', None)
    return ls if ls is not None else (lambda t: t)


def select_embed(ctx: PruneContext) -> torch.Tensor:
    """Kept residual channels: each producer of the stream (patch projection, every o_proj and fc2, rows scaled
    by their LayerScale for a row-norm criterion) scored, total-sum scaled and averaged."""
    n, keep = ctx.dims_before.embed, ctx.dims_after.embed
    if keep == n:
        return torch.arange(n)
    crit = ctx.settings.embed_criterion

    def default():
        producers = [_backbone(ctx.model).embeddings.patch_embeddings.projection.weight.flatten(1)]
        for layer in layers(ctx.model):
            for i, w in ((1, layer.attention.o_proj.weight), (2, layer.mlp.fc2.weight)):
                ls = getattr(layer, f'layer_scale{i}', None)
                producers.append(w if crit == 'redundancy' or ls is None else w.detach() * ls.lambda1.detach()[:, None])
        return tss_average([ctx.row_scores(w, crit) for w in producers])
    return choose(ctx.selector, Group('embed', '', keep, (n,), ctx.model), default)


class LayerStep(Step):
    """Layer i: select, slice, re-fit."""

    def __init__(self, ctx: PruneContext, pruned: nn.Module, i: int, embed: torch.Tensor):
        self.i, self.embed = i, embed
        self.name = f'{layers_name(ctx.model)}.{i}'
        self.original, self.pruned = layers(ctx.model)[i], layers(pruned)[i]
        self.bd, self.od = ctx.dims_after.blocks[i], ctx.dims_before.blocks[i]
        self.params = [n for n, _ in ctx.model.named_parameters() if n.startswith(self.name + '.')]

    def _group(self, kind, keep, shape, cap, heads=None) -> Group:
        return Group(kind, self.name, keep, tuple(shape), self.original, block=self.i, captured=cap, heads=heads)

    def taps(self, ctx, pre) -> Dict[str, tuple]:
        a, mlp = self.original.attention, self.original.mlp
        taps = {'q': (a.q_proj, 'out'), 'k': (a.k_proj, 'out'), 'v': (a.v_proj, 'out'), 'fc2_in': (mlp.fc2, 'in')}
        if ctx.refit:
            e = self.embed.to(a.o_proj.weight.device)
            taps.update(o_out=(a.o_proj, 'out', e), fc1_out=(mlp.fc1, 'out'), fc2_out=(mlp.fc2, 'out', e))
        if ctx.settings.head_criterion == 'output' or ctx.wants('proj_in'):
            taps['proj_in'] = (a.o_proj, 'in')
        return taps

    def after_capture(self, cap: dict) -> None:
        if 'q' in cap:
            cap['qkv'] = torch.cat([cap.pop('q'), cap.pop('k'), cap.pop('v')], dim=-1)

    def _qk(self, cap: dict):
        H, d = self.od.heads, self.od.qk
        B, N, _ = cap['qkv'].shape
        qkv = cap['qkv'].view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]

    def select(self, ctx: PruneContext, cap: dict, pre) -> BlockSelection:
        bd, od, ob, s = self.bd, self.od, self.original, ctx.settings
        H, d = od.heads, od.qk
        a = ob.attention
        with ctx.timer('selection'):
            if bd.heads == H:
                heads = torch.arange(H)
            else:
                def heads_default():
                    if s.head_criterion == 'snp':
                        q, k = self._qk(cap)
                        return sum(head_energy(qc, kc, s.gamma or bd.qk)
                                   for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
                    return head_output(cap['proj_in'], a.o_proj.weight, H)
                heads = choose(ctx.selector, self._group('heads', bd.heads, (H,), cap), heads_default)
        with ctx.timer('qk_scoring'):
            if bd.qk == d:
                qk = torch.arange(d).expand(bd.heads, d).clone()
            else:
                def qk_default():
                    if s.qk_criterion == 'snp':
                        q, k = self._qk(cap)
                        q, k = q[:, heads], k[:, heads]
                        return sum(ops.qk_scores(qc, kc, s.gamma or bd.qk)
                                   for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
                    wq, wk = a.q_proj.weight.float().view(H, d, -1), a.k_proj.weight.float().view(H, d, -1)
                    return (wq.norm(dim=2) * wk.norm(dim=2))[heads]
                qk = choose(ctx.selector, self._group('qk', bd.qk, (bd.heads, d), cap, heads), qk_default)
        with ctx.timer('selection'):
            if bd.v == d:
                v = torch.arange(d).expand(bd.heads, d).clone()
            else:
                def v_default():
                    rows = head_rows(torch.arange(d).expand(bd.heads, d), d, heads=heads)
                    act = (take_cols(cap['qkv'], (rows + 2 * H * d).to(cap['qkv'].device)).float().pow(2).sum(dim=(0, 1))
                           if s.v_criterion == 'activation' else None)
                    return ctx.row_scores(a.v_proj.weight[rows], s.v_criterion, act).view(bd.heads, d)
                v = choose(ctx.selector, self._group('v', bd.v, (bd.heads, d), cap, heads), v_default)
            n_hidden = ob.mlp.fc1.out_features
            if bd.mlp == n_hidden:
                mlp = torch.arange(n_hidden)
            else:
                def mlp_default():
                    act = cap['fc2_in'].float().pow(2).sum(dim=(0, 1)) if s.mlp_criterion == 'activation' else None
                    return ctx.row_scores(ob.mlp.fc1.weight, s.mlp_criterion, act)
                mlp = choose(ctx.selector, self._group('mlp', bd.mlp, (n_hidden,), cap), mlp_default)
        cap.pop('fc2_in', None)
        return BlockSelection(qk, v, mlp, heads if bd.heads < H else None)

    def plan(self, ctx, sel):
        return block_plan(ctx.model, self.i, sel, self.embed)

    @torch.no_grad()
    def refit(self, ctx: PruneContext, x, xp, cap, sel):
        """Sequential re-fit of the pruned layer: q_proj, k_proj, v_proj, o_proj, fc1, fc2, each from the pruned
        model's own inputs to the original layer's outputs at the kept rows."""
        pb, batch, damp, stats, p = self.pruned, ctx.batch, ctx.settings.damp, ctx.stats, self.name
        H, d = self.od.heads, self.od.qk
        dev = xp.device
        rows = token_subset(xp.shape[0] * xp.shape[1], ctx.settings.refit_tokens, ctx.gen)
        q_rows = head_rows(sel.qk, d, heads=sel.heads)
        targets = (('q_proj', q_rows), ('k_proj', q_rows + H * d), ('v_proj', head_rows(sel.v, d, 2 * H * d, sel.heads)))
        n1_name, n2_name = norm_names(pb)
        a = pb.attention
        n1 = apply(getattr(pb, n1_name), xp, batch)
        for name, cols in targets:
            stats[f'{p}.attention.{name}'] = fit(getattr(a, name), n1, take_cols(cap['qkv'], cols.to(dev)), rows, damp)
        del cap['qkv']
        _, c = run_captured(Call(lambda t: a(t)[0]), n1, {'ctx': (a.o_proj, 'in'), 'pred': (a.o_proj, 'out')}, batch)
        stats[f'{p}.attention.o_proj'] = fit(a.o_proj, c['ctx'], cap.pop('o_out'), rows, damp, c['pred'])
        ls1, ls2 = _branch_scale(pb, 1), _branch_scale(pb, 2)
        xp_mid = xp + apply(lambda t: ls1(a.o_proj(t)), c['ctx'], batch)
        del n1, c
        n2 = apply(getattr(pb, n2_name), xp_mid, batch)
        stats[f'{p}.mlp.fc1'] = fit(pb.mlp.fc1, n2, take_cols(cap.pop('fc1_out'), sel.mlp.to(dev)), rows, damp)
        _, c = run_captured(pb.mlp, n2, {'hidden': (pb.mlp.fc2, 'in'), 'pred': (pb.mlp.fc2, 'out')}, batch)
        stats[f'{p}.mlp.fc2'] = fit(pb.mlp.fc2, c['hidden'], cap.pop('fc2_out'), rows, damp, c['pred'])
        xp_out = xp_mid + apply(lambda t: ls2(pb.mlp.fc2(t)), c['hidden'], batch)
        return finite(xp_out, f'the output of {p} of the pruned model')


def _head_forward(model: nn.Module, t: torch.Tensor) -> None:
    """The model's forward after the last layer, on its final hidden states t (hooks capture the classifiers)."""
    bb = _backbone(model)
    t = bb.layernorm(t)
    if getattr(bb, 'pooler', None) is not None:
        bb.pooler(t)
    if hasattr(model, 'cls_classifier'):  # the distilled DeiT: one classifier per token
        model.cls_classifier(t[:, 0])
        model.distillation_classifier(t[:, 1])
    elif isinstance(getattr(model, 'classifier', None), nn.Linear):
        feats = t[:, 0]
        if model.classifier.in_features == 2 * t.shape[-1]:  # Dinov2: [CLS | mean of patch tokens]
            feats = torch.cat([t[:, 0], t[:, 1:].mean(dim=1)], dim=1)
        model.classifier(feats)
    return t


@torch.no_grad()
def refit_heads(ctx: PruneContext, pruned: nn.Module, x: torch.Tensor, xp: torch.Tensor,
                names: Optional[list] = None) -> None:
    """Re-fit the classifiers (and ViTModel's pooler) from the pruned final hidden states to the original's
    outputs."""
    names = head_names(ctx.model) if names is None else names
    if not names:
        return
    model, batch = ctx.model, ctx.batch
    _, orig = run_captured(Call(lambda t: _head_forward(model, t)), x,
                           {n: (model.get_submodule(n), 'out') for n in names}, batch)
    _, new = run_captured(Call(lambda t: _head_forward(pruned, t)), xp,
                          {n: (pruned.get_submodule(n), 'in') for n in names}, batch)
    for n in names:
        rows = token_subset(new[n].shape[:-1].numel(), ctx.settings.refit_tokens, ctx.gen)
        ctx.stats[n] = fit(pruned.get_submodule(n), new[n], orig[n], rows, ctx.settings.damp)
