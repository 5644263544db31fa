"""Reconstruction-aware selection: keep the inputs of a layer whose removal the re-fit can compensate least.

The re-fit (snp_fast/refit.py) solves, for a consumer Linear with weight W (out, n) and calibration inputs X,
the ridge least squares of the kept columns K towards the original outputs. With the Gram matrix
G = [X 1]ᵀ[X 1] (the ones column: the bias, which is never removed) and G_λ = G + λI, λ = damp·mean(diag G)
as in the re-fit, the best damped fit after removing the input columns S costs (structured OBS, Optimal
Brain Surgeon for a set of columns; ZipLM, SlimGPT)

    E(S) = min_{W' : W'_S = 0} ‖X (W' − W)ᵀ‖² + λ ‖W' − W‖²  =  tr(W_S [(G_λ⁻¹)_SS]⁻¹ W_Sᵀ)          (1)

(`obs_error`; with λ → 0 it is the re-fit's calibration error increase, the λ‖W_S‖² it adds is the ridge's
own price of zeroing W_S). Finding the best S of a given size is combinatorial; `greedy_removal` removes
one column at a time — the one of least OBS cost ‖w_j‖² / (G_λ⁻¹)_jj under the CURRENT compensated weights —
then applies the optimal compensation to W and the rank-1 downdate of G_λ⁻¹ (for block > 1: the `block`
cheapest at once, with the block update). The costs of the steps sum to E(S) of the removed set exactly.

Consumers (what `Reconstruction` scores, through the prune(selection=...) hook):
  * FFN neurons: fc2's input columns; X = the calibration FFN hidden activations (capture 'fc2_in');
  * value filters: attn.proj's input columns; X = the attention context (capture 'proj_in'), all heads
    jointly (proj mixes heads, so its re-fit compensates across them) with the same number removed per head;
    the columns of heads removed whole go first (forced), before the greedy choice inside the kept heads.
Q/K pairs and residual-stream channels keep the built-in criteria (scores None).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..refit import DEFAULT_DAMP
from ..selection import Group, Selector

__all__ = ['Reconstruction', 'consumer_gram', 'damped_gram', 'obs_error', 'greedy_removal', 'joint_greedy_removal',
           'removal_scores', 'stream_consumers']


@torch.no_grad()
def consumer_gram(x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """(n[+1], n[+1]) float64 Gram of the consumer's inputs x (..., n), bordered by a ones column (the bias)."""
    x = x.reshape(-1, x.shape[-1]).double()
    if bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    return x.t() @ x


def damped_gram(gram: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """G + λI, λ = damp · mean(diag G) (the re-fit's ridge rule)."""
    g = gram.double().clone()
    g.diagonal().add_(damp * g.diagonal().mean().clamp_min(1e-12))
    return g


def obs_error(weight: torch.Tensor, gram: torch.Tensor, removed: Sequence[int], damp: float = DEFAULT_DAMP) -> float:
    """E(S) of (1): the damped least-squares error after removing the input columns `removed` of `weight`
    (out, n[+1]) and re-fitting the rest optimally; gram from consumer_gram (the same column count)."""
    s = torch.as_tensor(list(removed), dtype=torch.long)
    if s.numel() == 0:
        return 0.0
    ginv = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(gram, damp)))
    ws = weight.detach().double()[:, s]
    return float(torch.einsum('os,st,ot->', ws, torch.linalg.inv(ginv[s][:, s]), ws))


@torch.no_grad()
def greedy_removal(weight: torch.Tensor, gram: torch.Tensor, candidates: Sequence[int], n_remove: int, *,
                   damp: float = DEFAULT_DAMP, forced: Sequence[int] = (), group_of: Optional[torch.Tensor] = None,
                   quota: Optional[Sequence[int]] = None, block: int = 1):
    """Greedy structured OBS: the removal order of `n_remove` of the `candidates` columns of `weight`.

    Args:
        weight: (out, n[+1]) the consumer's weight (a bias column, when the Gram has one, is never removed).
        gram: (n[+1], n[+1]) consumer_gram of its calibration inputs.
        candidates: the columns that may be removed.
        n_remove: how many of them to remove.
        damp: the ridge, as the re-fit's.
        forced: columns removed first, whatever they cost (e.g. the columns of heads removed whole).
        group_of, quota: optional per-candidate group id (a LongTensor over all columns) and the number each
            group must lose (sum = n_remove): the value filters of each head.
        block: columns removed per step (1: one at a time, the exact greedy; > 1: the `block` cheapest by the
            current single costs at once, with the block update; a group's quota is never overshot).

    Returns:
        (order, costs): the removed candidate columns in removal order (LongTensor), and each step's cost
        (the costs of one block are split evenly); their sum plus the forced columns' cost is E(S) of (1).
    """
    ginv = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(gram, damp)))
    w = weight.detach().double().clone()
    n = w.shape[1]

    def remove(cols: torch.Tensor) -> float:
        nonlocal w, ginv
        if cols.numel() == 1:  # the rank-1 case in place (the greedy's every step): no inverse, no copies of W
            j = int(cols)
            gjj, row, wj = float(ginv[j, j]), ginv[j].clone(), w[:, j].clone()
            w.addr_(wj, row, alpha=-1.0 / gjj)
            ginv.addr_(row, row, alpha=-1.0 / gjj)
            return float(wj.dot(wj)) / gjj
        gss = ginv[cols][:, cols]
        ws = w[:, cols]
        inv = torch.linalg.inv(gss)
        cost = float(torch.einsum('os,st,ot->', ws, inv, ws))
        rows = ginv[cols]                        # (|S|, n)
        w = w - ws @ inv @ rows                  # the optimal compensation of the kept columns (W_S becomes 0)
        ginv = ginv - rows.t() @ inv @ rows      # the inverse Gram of the remaining columns (zero at S)
        return cost

    forced = torch.as_tensor(list(forced), dtype=torch.long)
    if forced.numel():
        remove(forced)
    cand = torch.as_tensor(list(candidates), dtype=torch.long)
    if not 0 <= n_remove <= cand.numel():
        raise ValueError(f'greedy_removal: cannot remove {n_remove} of {cand.numel()} candidates')
    left = None
    if quota is not None:
        if group_of is None:
            raise ValueError('greedy_removal: quota= needs group_of=')
        left = torch.as_tensor(list(quota), dtype=torch.long).clone()
        if int(left.sum()) != n_remove:
            raise ValueError(f'greedy_removal: quotas sum to {int(left.sum())}, not n_remove={n_remove}')
        cgroup = group_of[cand].long()
    alive = torch.ones(cand.numel(), dtype=torch.bool)
    order: List[int] = []
    costs: List[float] = []
    while len(order) < n_remove:
        d = ginv.diagonal()[cand].clamp_min(torch.finfo(torch.float64).tiny)
        single = w.pow(2).sum(0)[cand] / d
        ok = alive.clone()
        if left is not None:
            ok &= left[cgroup] > 0
        single[~ok] = float('inf')
        k = min(block, n_remove - len(order))
        if k == 1:
            pick = single.argmin().view(1)
        else:  # the k cheapest, each group at most its remaining quota
            pick, taken = [], torch.zeros_like(left) if left is not None else None
            for i in single.argsort().tolist():
                if len(pick) == k or not bool(ok[i]):
                    break
                if left is not None:
                    g = int(cgroup[i])
                    if taken[g] >= left[g]:
                        continue
                    taken[g] += 1
                pick.append(i)
            pick = torch.tensor(pick, dtype=torch.long)
        c = remove(cand[pick])
        alive[pick] = False
        if left is not None:
            left -= torch.bincount(cgroup[pick], minlength=left.numel())
        order += cand[pick].tolist()
        costs += [c / pick.numel()] * pick.numel()
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)


@torch.no_grad()
def joint_greedy_removal(consumers: Sequence[tuple], n: int, n_remove: int, *, damp: float = DEFAULT_DAMP):
    """Greedy structured OBS over inputs SHARED by several consumers (the residual stream's channels): each step
    removes the column j in [0, n) of least Σ_c s_c ‖w_c,j‖² / (G_c,λ⁻¹)_jj, then compensates every consumer.

    consumers: (weight (out_c, n[+1]), gram (n[+1], n[+1]), s_c) each; s_c weighs its error (e.g. 1 / its output
    energy, so that every consumer counts alike). Returns the removal order (LongTensor) and each step's cost."""
    state = []
    for w, g, sc in consumers:
        ginv = torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(g, damp)))
        state.append([w.detach().double().clone(), ginv, float(sc)])
    alive = torch.ones(n, dtype=torch.bool)
    order, costs = [], []
    for _ in range(n_remove):
        total = torch.zeros(n, dtype=torch.float64)
        for w, ginv, sc in state:
            total += sc * w.pow(2).sum(0)[:n] / ginv.diagonal()[:n].clamp_min(torch.finfo(torch.float64).tiny)
        total[~alive] = float('inf')
        j = int(total.argmin())
        for st in state:
            w, ginv, _ = st
            gjj, row, wj = float(ginv[j, j]), ginv[j].clone(), w[:, j].clone()
            w.addr_(wj, row, alpha=-1.0 / gjj)
            ginv.addr_(row, row, alpha=-1.0 / gjj)
        alive[j] = False
        order.append(j)
        costs.append(float(total[j]))
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)


def removal_scores(n: int, order: torch.Tensor) -> torch.Tensor:
    """(n,) scores, higher = keep, for a removal order: the t-th removed scores t, every kept member n."""
    s = torch.full((n,), float(n))
    s[order] = torch.arange(order.numel(), dtype=torch.float)
    return s


def stream_consumers(model: nn.Module) -> Optional[List[nn.Linear]]:
    """The Linears that read the residual stream of a plain timm ViT (every block's attn.qkv and mlp.fc1, the
    classifier head), or None when the model is not of that shape."""
    width = getattr(model, 'embed_dim', None)
    out = []
    for blk in getattr(model, 'blocks', []):
        qkv, fc1 = getattr(getattr(blk, 'attn', None), 'qkv', None), getattr(getattr(blk, 'mlp', None), 'fc1', None)
        if not (isinstance(qkv, nn.Linear) and isinstance(fc1, nn.Linear)):
            return None
        out += [qkv, fc1]
    head = getattr(model, 'head', None)
    if isinstance(head, nn.Linear):
        out.append(head)
    if not out or any(m.in_features != width for m in out):
        return None
    return out


@torch.no_grad()
def stream_grams(model: nn.Module, consumers: List[nn.Linear], calib: torch.Tensor, batch: int) -> List[torch.Tensor]:
    """consumer_gram of every consumer's calibration inputs, accumulated by forward hooks over batches."""
    grams = [None] * len(consumers)

    def hook(i):
        def f(_m, inp, _out):
            g = consumer_gram(inp[0], True)
            grams[i] = g if grams[i] is None else grams[i].add_(g)
        return f
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(consumers)]
    try:
        for s in range(0, calib.shape[0], batch):
            model(calib[s:s + batch])
    finally:
        for h in handles:
            h.remove()
    return grams


class Reconstruction(Selector):
    """FFN neurons and value filters chosen by the consumer's least-squares error after the re-fit (greedy
    structured OBS, see the module docstring); Q/K pairs, heads and the residual stream: the built-in
    criteria. `prune(..., criteria='reconstruction')` uses it with prune's own damp.

    Args:
        damp: the ridge of (1), relative to the mean diagonal of the Gram (default: the re-fit's).
        block: columns removed per greedy step (1: one at a time).
        groups: which groups it answers for ('mlp', 'v', 'embed').
        calib, batch: calibration images (as given to prune) for the 'embed' group: the residual-stream channels
            are then chosen jointly for all their consumers (every qkv, fc1 and the head; each consumer's error
            relative to its output energy) from one run of the original model; without them, or for a model of
            another shape, the built-in embed criterion.
    """
    captures = ('fc2_in', 'proj_in')

    def __init__(self, damp: float = DEFAULT_DAMP, block: int = 1, groups: Sequence[str] = ('mlp', 'v', 'embed'),
                 calib: Optional[torch.Tensor] = None, batch: int = 32):
        if block < 1:
            raise ValueError(f'block must be >= 1, got {block}')
        self.damp, self.block, self.groups, self.calib, self.batch = damp, block, tuple(groups), calib, batch

    def scores(self, group: Group) -> Optional[torch.Tensor]:
        if group.kind not in self.groups:
            return None
        if group.kind == 'mlp':
            return self._mlp(group)
        if group.kind == 'v':
            return self._v(group)
        if group.kind == 'embed':
            return self._embed(group)
        return None

    def _embed(self, group: Group) -> Optional[torch.Tensor]:
        model = group.module
        consumers = stream_consumers(model) if self.calib is not None and group.stage is None else None
        if consumers is None or group.shape != (consumers[0].in_features,):
            return None
        n = group.shape[0]
        grams = stream_grams(model, consumers, self.calib, self.batch)
        items = []
        for m, g in zip(consumers, grams):
            w = m.weight.detach().double()
            if m.bias is not None:
                w = torch.cat([w, m.bias.detach().double().unsqueeze(1)], dim=1)
            else:
                g = g[:n, :n]
            energy = float(torch.einsum('oi,ij,oj->', w, g, w))  # ‖[X 1] Wᵀ‖²: the consumer's output energy
            items.append((w, g, 1.0 / max(energy, 1e-30)))
        order, _ = joint_greedy_removal(items, n, n - group.keep, damp=self.damp)
        return removal_scores(n, order).to(group.module.blocks[0].attn.qkv.weight.device)

    def _consumer(self, module: nn.Module, path: str, capture: str, group: Group):
        layer = module
        for name in path.split('.'):
            layer = getattr(layer, name, None)
        x = group.captured.get(capture)
        if not isinstance(layer, nn.Linear) or x is None or x.shape[-1] != layer.in_features:
            return None, None, None  # not a shape this criterion knows (another family): the built-in criterion
        w = layer.weight.detach().double()
        if layer.bias is not None:
            w = torch.cat([w, layer.bias.detach().double().unsqueeze(1)], dim=1)
        return w, consumer_gram(x, layer.bias is not None), layer.in_features

    def _mlp(self, group: Group) -> Optional[torch.Tensor]:
        w, g, n = self._consumer(group.module, 'mlp.fc2', 'fc2_in', group)
        if w is None or group.shape != (n,):
            return None
        order, _ = greedy_removal(w, g, range(n), n - group.keep, damp=self.damp, block=self.block)
        return removal_scores(n, order).to(w.device)

    def _v(self, group: Group) -> Optional[torch.Tensor]:
        w, g, n = self._consumer(group.module, 'attn.proj', 'proj_in', group)
        attn = getattr(group.module, 'attn', None)
        H = getattr(attn, 'num_heads', 0)
        if w is None or H == 0 or n % H:
            return None
        d = n // H
        heads = group.heads if group.heads is not None else torch.arange(H)
        if group.shape != (heads.numel(), d):  # grouped-query attention: v heads are not proj's column heads
            return None
        heads = heads.long().cpu()
        cols = (heads.unsqueeze(1) * d + torch.arange(d)).flatten()
        dropped = torch.ones(H, dtype=torch.bool)
        dropped[heads] = False
        forced = (torch.nonzero(dropped).flatten().unsqueeze(1) * d + torch.arange(d)).flatten()
        group_of = torch.zeros(w.shape[1], dtype=torch.long)
        group_of[cols] = torch.arange(heads.numel()).repeat_interleave(d)
        per_head = d - group.keep
        order, _ = greedy_removal(w, g, cols, per_head * heads.numel(), damp=self.damp, forced=forced,
                                  group_of=group_of, quota=[per_head] * heads.numel(), block=self.block)
        s = torch.full((n,), float(n))
        s[order] = torch.arange(order.numel(), dtype=torch.float)
        return s[cols].view(heads.numel(), d).to(w.device)
