"""The ViT family's pipeline hooks: what runs before the first block, the stream selection, and one Step per
block (its taps, its q/k, v, FFN and head selection, its slices and its sequential re-fit), then the heads.

Per block (docs/METHOD.md): run the ORIGINAL block on its calibration hidden states X, capturing q/k/v and
the re-fit targets (proj's, fc1's and fc2's outputs, cut to what the pruned block keeps); choose heads, q/k
pairs (SNP's attention-score criterion), value filters and FFN neurons; slice; re-fit qkv, proj, fc1 and fc2
in that order, each from the PRUNED model's own inputs to the original outputs at the kept rows.
"""
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ... import ops
from ...capture import apply, chunks, finite, run_captured, take_cols, token_subset
from ...refit import fit
from ...scores import head_energy, head_output, qk_magnitude, tss_average
from ...selection import Group, choose
from ...settings import PruneContext
from ..base import Step
from . import roles
from .structure import BlockSelection
from .surgery import block_plan, head_rows, value_out_cols

__all__ = ['prefix', 'block_kwargs', 'select_embed', 'BlockStep', 'embed_scores', 'scaled_rows']


@torch.no_grad()
def prefix(model: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Hidden states entering the first block."""
    out = []
    for x in chunks(images, batch):
        x = model.patch_embed(x)
        if hasattr(model, '_pos_embed'):
            x = model._pos_embed(x)
            # the Eva family's _pos_embed also returns the RoPE tables (see block_kwargs) and drops patches itself
            x = x[0] if isinstance(x, tuple) else model.patch_drop(x)
        elif model.cls_token is not None:  # VisionTransformerRelPos: positions are attention biases (block_kwargs)
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        out.append(getattr(model, 'norm_pre', nn.Identity())(x))
    return torch.cat(out) if len(out) > 1 else out[0]


@torch.no_grad()
def block_kwargs(model: nn.Module, images: Optional[torch.Tensor]) -> List[dict]:
    """Keyword arguments the model's forward passes to each block: the RoPE tables of the Eva family
    (one table for all blocks, or one per block for 'mixed' RoPE), VisionTransformerRelPos's shared
    relative-position bias, nothing for a plain ViT."""
    if images is None:
        return [{} for _ in model.blocks]
    if getattr(model, 'shared_rel_pos', None) is not None:
        return [{'shared_rel_pos': model.shared_rel_pos.get_bias()} for _ in model.blocks]
    if getattr(model, 'rope', None) is None:
        return [{} for _ in model.blocks]
    _, rope = model._pos_embed(model.patch_embed(images[:1]))
    if getattr(model, 'rope_mixed', False):
        return [{'rope': rope[i]} for i in range(len(model.blocks))]
    return [{'rope': rope} for _ in model.blocks]


# ------------------------------------------------------------------------------------------------
# the residual stream (embedding)

def scaled_rows(blk: nn.Module, i: int, w: torch.Tensor) -> torch.Tensor:
    """The rows of branch i's output layer as they reach the stream, for a row-norm criterion: times the
    branch's LayerScale, when it has one (a post-norm block's norm is no per-channel gain: left out)."""
    gain = None if roles.is_post_norm(blk) else getattr(getattr(blk, f'ls{i}', None), 'gamma',
                                                        getattr(blk, f'gamma_{i}', None))
    return w if gain is None else w.detach() * gain.detach().to(w.dtype).unsqueeze(1)


def embed_scores(ctx: PruneContext) -> torch.Tensor:
    """Residual-channel scores, total-sum scaled and averaged over the stream's producers (or its blocks'
    outputs for the "activation" criterion)."""
    model, criterion, batch = ctx.model, ctx.settings.embed_criterion, ctx.batch
    if criterion == 'activation':
        if ctx.calib is None:
            raise ValueError('embed_criterion="activation" needs calibration images')
        x = prefix(model, ctx.calib, batch)
        per_block = []
        for i, (blk, kw) in enumerate(zip(model.blocks, block_kwargs(model, ctx.calib))):
            x = finite(apply(lambda t: blk(t, **kw), x, batch), f'the output of blocks.{i} of the original model')
            per_block.append(x.float().pow(2).sum(dim=(0, 1)).sqrt())
        return tss_average(per_block)
    producers = [model.patch_embed.proj.weight.flatten(1)]
    for blk in model.blocks:
        for i, w in ((1, blk.attn.proj.weight), (2, blk.mlp.fc2.weight)):
            # (cosines of rows, the redundancy scores, do not change with row scales: no scaled copies)
            producers.append(w if criterion == 'redundancy' else scaled_rows(blk, i, w))
    return tss_average([ctx.row_scores(w, criterion) for w in producers])


def select_embed(ctx: PruneContext) -> torch.Tensor:
    """The kept residual-stream channels (sorted)."""
    n, keep = ctx.dims_before.embed, ctx.dims_after.embed
    if keep == n:
        return torch.arange(n)
    return choose(ctx.selector, Group('embed', '', keep, (n,), ctx.model), lambda: embed_scores(ctx))


# ------------------------------------------------------------------------------------------------
# one block

def _split_qk(attn: nn.Module, qkv: torch.Tensor, H: int, d: int):
    B, N, _ = qkv.shape
    qkv = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    with torch.no_grad():
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])


class BlockStep(Step):
    """Block i of a ViT: select, slice, re-fit."""

    def __init__(self, ctx: PruneContext, pruned: nn.Module, i: int, embed: torch.Tensor, kwargs: dict):
        self.i, self.name, self.embed, self.kwargs = i, f'blocks.{i}', embed, kwargs
        self.original, self.pruned = ctx.model.blocks[i], pruned.blocks[i]
        self.bd, self.od = ctx.dims_after.blocks[i], ctx.dims_before.blocks[i]
        self.params = sorted(n for n, _ in ctx.model.named_parameters() if n.startswith(self.name + '.'))
        s = ctx.settings
        # FFN neurons chosen from the weights are known before the run: only their fc1 outputs are then kept
        self.mlp_first = (s.mlp_criterion != 'activation' and not ctx.wants('fc2_in')) or self.bd.mlp in (0, self.od.mlp)

    def _group(self, kind: str, keep: int, shape, cap=None, heads=None, module=None) -> Group:
        return Group(kind, self.name, keep, tuple(shape), module or self.original, block=self.i,
                     captured={} if cap is None else cap, heads=heads)

    def _select_mlp(self, ctx: PruneContext, cap: Optional[dict]) -> torch.Tensor:
        mlp, keep = self.original.mlp, self.bd.mlp
        if keep in (0, roles.mlp_hidden(mlp)):
            return torch.arange(keep)
        crit = ctx.settings.mlp_criterion
        act = lambda: cap['fc2_in'].float().pow(2).sum(dim=(0, 1)) if crit == 'activation' else None  # noqa: E731
        return choose(ctx.selector, self._group('mlp', keep, (roles.mlp_hidden(mlp),), cap),
                      lambda: ctx.row_scores(roles.mlp_in_weight(mlp), crit, act()))

    def preselect(self, ctx: PruneContext):
        if self.mlp_first:
            with ctx.timer('selection'):
                return self._select_mlp(ctx, None)
        return None

    def taps(self, ctx: PruneContext, m_sel) -> Dict[str, tuple]:
        """What scoring and the re-fit capture from the original block, and no more: q/k/v (or, when the
        projection is not a single Linear call, e.g. EvaAttention's F.linear with separate biases, the
        attention's input); with the re-fit on, its targets, each cut to what the pruned block keeps: proj's
        and fc2's outputs at the kept stream channels, every fc1 output at the rows of the kept neurons (all
        rows when they are chosen after the run), an output gate's output (all rows); fc2's input when the
        FFN is chosen from activations; attn.proj's input for the "output" head criterion."""
        blk = self.original
        a, mlp = blk.attn, blk.mlp
        taps = {'qkv': (a.qkv, 'out')} if roles.qkv_layout(a) == 'fused' else {'attn_in': (a, 'in')}
        if ctx.refit:
            dev = a.proj.weight.device
            e = self.embed.to(dev)
            if getattr(a, 'gate', None) is not None:  # (all rows: the kept value filters are chosen after the run)
                taps['gate'] = (a.gate, 'out')
            for name, rows in roles.mlp_fc1_rows(mlp, torch.arange(0) if m_sel is None else m_sel).items():
                taps[name] = (getattr(mlp, name), 'out') if m_sel is None else (getattr(mlp, name), 'out', rows.to(dev))
            taps.update({'proj_out': (a.proj, 'out', e), 'fc2_out': (mlp.fc2, 'out', e)})
        if m_sel is None:
            taps['fc2_in'] = (mlp.fc2, 'in')
        if (ctx.settings.head_criterion == 'output' and 0 < self.bd.heads < self.od.heads) or ctx.wants('proj_in'):
            taps['proj_in'] = (a.proj, 'in')
        return taps

    def after_capture(self, cap: dict) -> None:
        if 'attn_in' in cap:
            cap['qkv'] = roles.qkv_output(self.original.attn, cap.pop('attn_in'))

    def _select_heads(self, ctx: PruneContext, cap: dict) -> torch.Tensor:
        """Kept original head indices (sorted)."""
        bd, od, attn = self.bd, self.od, self.original.attn
        if bd.heads in (0, od.heads):
            return torch.arange(bd.heads)
        H, d = od.heads, od.qk

        def default():
            if ctx.settings.head_criterion == 'snp':
                q, k = _split_qk(attn, cap['qkv'], H, d)
                return sum(head_energy(qc, kc, ctx.settings.gamma or bd.qk)
                           for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
            return head_output(cap['proj_in'], attn.proj.weight, H)
        return choose(ctx.selector, self._group('heads', bd.heads, (H,), cap), default)

    def select(self, ctx: PruneContext, cap: dict, m_sel) -> BlockSelection:
        bd, od, ob, s = self.bd, self.od, self.original, ctx.settings
        H, d = od.heads, od.qk
        with ctx.timer('selection'):
            heads = self._select_heads(ctx, cap)
        with ctx.timer('qk_scoring'):
            if bd.heads == 0 or bd.qk == d:  # nothing to choose inside the kept heads (none, or all dims)
                qk_sel = torch.arange(bd.qk).expand(bd.heads, bd.qk).clone()
            else:
                def qk_default():
                    if s.qk_criterion == 'snp':
                        q, k = _split_qk(ob.attn, cap['qkv'], H, d)
                        if heads.numel() < H:  # (all heads kept: the strided views, no copy)
                            q, k = q[:, heads], k[:, heads]
                        return sum(ops.qk_scores(qc, kc, s.gamma or bd.qk)
                                   for qc, kc in zip(chunks(q, ctx.batch), chunks(k, ctx.batch)))
                    return qk_magnitude(roles.qkv_weight(ob.attn)[0], H, d)[heads]
                qk_sel = choose(ctx.selector, self._group('qk', bd.qk, (bd.heads, d), cap, heads), qk_default)
        with ctx.timer('selection'):
            g = roles.kv_groups(ob.attn)  # grouped-query attention: v filters belong to the H / g value heads
            if bd.heads == 0 or bd.v == d:
                v_sel = torch.arange(bd.v).expand(bd.heads // g, bd.v).clone()
            else:  # value filters of the kept heads only compete with each other
                def v_default():
                    rows = head_rows(torch.arange(d).expand(bd.heads // g, d), d, (H + H // g) * d,
                                     heads if g == 1 else None)
                    v_w = roles.qkv_weight(ob.attn)[0][rows]
                    act = (take_cols(cap['qkv'], rows.to(cap['qkv'].device)).float().pow(2).sum(dim=(0, 1))
                           if s.v_criterion == 'activation' else None)
                    return ctx.row_scores(v_w, s.v_criterion, act).view(bd.heads // g, d)
                v_sel = choose(ctx.selector, self._group('v', bd.v, (bd.heads // g, d), cap,
                                                         heads if g == 1 else None), v_default)
            if m_sel is None:  # chosen from the run: the captured fc1 outputs are cut to the kept rows now
                m_sel = self._select_mlp(ctx, cap)
                cap.pop('fc2_in', None)
                for name, rows in roles.mlp_fc1_rows(ob.mlp, m_sel).items():
                    if name in cap:
                        cap[name] = take_cols(cap[name], rows.to(cap[name].device))
        return BlockSelection(qk_sel, v_sel, m_sel, heads if bd.heads < H else None)

    def plan(self, ctx: PruneContext, sel: BlockSelection):
        return block_plan(ctx.model, self.i, sel, self.embed)

    def refit(self, ctx: PruneContext, x, xp, cap, sel):
        if ctx.refit == 'oneshot':  # this block's inputs: the original hidden states at the kept channels
            xp = x.index_select(-1, self.embed.to(x.device))
        return refit_block(ctx, self.pruned, xp, cap, sel, self.od.heads, self.od.qk, self.i, self.kwargs)


@torch.no_grad()
def refit_block(ctx: PruneContext, pb: nn.Module, xp: torch.Tensor, cap: dict, sel: BlockSelection, H: int, d: int,
                i: int, kwargs: Optional[dict] = None) -> torch.Tensor:
    """Sequential re-fit of one pruned block: qkv, proj, fc1, fc2 (docs/METHOD.md, "The re-fit").

    cap: the original block's captures as BlockStep.taps gives them (the full [q | k | v], the other targets
    already cut to what the pruned block keeps); each is dropped from `cap` once its layer is fitted, so the
    block's later fits do not hold the earlier targets. kwargs: what the block's forward gets besides x (RoPE)."""
    damp, batch, stats = ctx.settings.damp, ctx.batch, ctx.stats
    dev = xp.device
    rows = token_subset(xp.shape[0] * xp.shape[1], ctx.settings.refit_tokens, ctx.gen)
    q_rows = head_rows(sel.qk, d, heads=sel.heads)
    g = roles.kv_groups(pb.attn)  # grouped-query attention (RoPE, q/k whole): all of k's H / g heads
    k_rows = q_rows if g == 1 else torch.arange(H // g * d)
    qkv_rows = torch.cat([q_rows, k_rows + H * d, head_rows(sel.v, d, (H + H // g) * d, sel.heads)]).to(dev)
    p = f'blocks.{i}'

    n1 = apply(roles.branch_input(pb, 1), xp, batch)
    if qkv_rows.numel():  # else the attention branch is dropped: only proj's constant output is fitted
        for name, layer, cols, write_back in roles.qkv_fit_parts(pb.attn, sel.qk.numel(), sel.v.numel(),
                                                                 k_rows.numel()):
            target = take_cols(cap['qkv'], qkv_rows[cols.to(dev)])
            stats[f'{p}.attn.{name}'] = fit(layer, n1, target, rows, damp)
            write_back()
            del target
        if 'gate' in cap:  # the output gate (before its sigmoid), at the kept value columns
            target = take_cols(cap.pop('gate'), value_out_cols(pb.attn, sel, d).to(dev))
            stats[f'{p}.attn.gate'] = fit(pb.attn.gate, n1, target, rows, damp)
            del target
    cap.pop('gate', None)
    del cap['qkv']
    # the sliced proj's output on ctx comes with the run: it is the re-fit's starting prediction
    _, c = run_captured(pb.attn, n1, {'ctx': (pb.attn.proj, 'in'), 'pred': (pb.attn.proj, 'out')}, batch, kwargs)
    stats[f'{p}.attn.proj'] = fit(pb.attn.proj, c['ctx'], cap.pop('proj_out'), rows, damp, c['pred'])
    ls1, ls2 = roles.branch_scale(pb, 1), roles.branch_scale(pb, 2)
    xp_mid = xp + apply(lambda t: ls1(pb.attn.proj(t)), c['ctx'], batch)
    del n1, c
    n2 = apply(roles.branch_input(pb, 2), xp_mid, batch)
    for name in roles.mlp_fc1_rows(pb.mlp, sel.mlp):
        target = cap.pop(name)
        if sel.mlp.numel():
            stats[f'{p}.mlp.{name}'] = fit(getattr(pb.mlp, name), n2, target, rows, damp)
        del target
    _, c = run_captured(pb.mlp, n2, {'hidden': (pb.mlp.fc2, 'in'), 'pred': (pb.mlp.fc2, 'out')}, batch)
    stats[f'{p}.mlp.fc2'] = fit(pb.mlp.fc2, c['hidden'], cap.pop('fc2_out'), rows, damp, c['pred'])
    xp_out = xp_mid + apply(lambda t: ls2(pb.mlp.fc2(t)), c['hidden'], batch)
    return finite(xp_out, f'the output of blocks.{i} of the pruned model')
