"""Reconstruction-aware selection: remove what the re-fit can compensate best (snp_fast.criteria.Reconstruction).

The re-fit (snp_fast/refit.py) solves, for a consumer Linear with weight W (out, n) and calibration inputs X,
the ridge least squares of the kept columns K towards the original outputs. With the Gram matrix
G = [X 1]ᵀ[X 1] (the ones column: the bias, which is never removed) and G_λ = G + λI, λ = damp·mean(diag G)
as in the re-fit, the best damped fit after removing the input columns S costs (structured OBS, Optimal
Brain Surgeon for a set of columns; ZipLM, SlimGPT)

    E(S) = min_{W' : W'_S = 0} ‖X (W' − W)ᵀ‖² + λ ‖W' − W‖²  =  tr(W_S [(G_λ⁻¹)_SS]⁻¹ W_Sᵀ)          (1)

(`obs_error`; with λ → 0 it is the re-fit's calibration error increase, the λ‖W_S‖² it adds is the
ridge's own price of zeroing W_S). Finding the best S of a given size is combinatorial; `greedy_removal`
removes one column at a time — the one of least OBS cost ‖w_j‖² / (G_λ⁻¹)_jj under the CURRENT compensated
weights — then applies the optimal compensation to W and the rank-1 downdate of G_λ⁻¹ (for block > 1: the
`block` cheapest at once, with the block update). The costs of the steps sum to E(S) of the removed set.

What `Reconstruction` scores (through the prune(selection=...) hook; prune(criteria="reconstruction")):
  * FFN neurons: fc2's input columns; X = the calibration FFN hidden activations (capture 'fc2_in');
  * value filters: attn.proj's input columns; X = the attention context (capture 'proj_in'), all heads
    jointly (proj mixes heads, so its re-fit compensates across them) with the same number removed per head;
    the columns of heads removed whole go first (forced), before the greedy choice inside the kept heads.
  * residual-stream channels (with calibration images): every block's qkv and fc1 and the classifier head
    read the stream; one greedy over the channels minimises the sum of their errors (1), each relative to its
    output energy, all consumers compensated at every step (joint_greedy_removal);
  * q/k pairs: their consumer is the bilinear attention logit QKᵀ, which the re-fit (q and k each fitted to its
    original values) does not compensate; the error after the re-fit is the removed pairs' share
    ‖Σ_{i∈S} q_i k_iᵀ‖²_F over the calibration images = 1_Sᵀ M 1_S, M = Σ_images (QᵀQ) ∘ (KᵀK) (logit_gram), and
    each head removes greedily the pair that adds least (greedy_pairs).
Heads keep the built-in criterion (scores None), as do groups of a shape this module does not know (grouped-query
attention, separate q/k/v projections, staged models).
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..refit import DEFAULT_DAMP
from ..selection import Group, Selector

__all__ = ['Reconstruction', 'consumer_gram', 'damped_gram', 'obs_error', 'greedy_removal', 'joint_greedy_removal',
           'removal_scores', 'stream_consumers', 'logit_gram', 'greedy_pairs']


@torch.no_grad()
def consumer_gram(x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """(n[+1], n[+1]) float64 Gram of the consumer's inputs x (..., n), bordered by a ones column (the bias).
    The product in x's precision when it is fp32 or wider (fp32: as the re-fit's Gram; the fp64 product would
    cost more than the whole selection), the column sums and the result in fp64."""
    x = x.reshape(-1, x.shape[-1])
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    n = x.shape[1]
    g = x.new_empty((n + bias, n + bias), dtype=torch.float64)
    g[:n, :n] = x.t() @ x
    if bias:
        g[n, :n] = g[:n, n] = x.double().sum(0)
        g[n, n] = x.shape[0]
    return g


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
    # every consumer in one batch: weights zero-padded to the widest (out, n + 1), the bias column (if none: a
    # zero column with a unit Gram entry, which is never removed and couples to nothing)
    c, out = len(consumers), max(w.shape[0] for w, _, _ in consumers)
    w = torch.zeros(c, out, n + 1, dtype=torch.float64)
    ginv = torch.zeros(c, n + 1, n + 1, dtype=torch.float64)
    for i, (wi, g, _) in enumerate(consumers):
        m = wi.shape[1]
        w[i, :wi.shape[0], :m] = wi.detach().double()
        gi = torch.eye(n + 1, dtype=torch.float64)
        gi[:m, :m] = damped_gram(g, damp)
        ginv[i] = torch.cholesky_inverse(torch.linalg.cholesky(gi))
    sc = torch.tensor([float(s) for _, _, s in consumers], dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    order, costs = [], []
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(n_remove):
        per = w[:, :, :n].pow(2).sum(1) / ginv.diagonal(dim1=1, dim2=2)[:, :n].clamp_min(tiny)   # (c, n)
        total = (sc.unsqueeze(1) * per).sum(0)
        total[~alive] = float('inf')
        j = int(total.argmin())
        gjj = ginv[:, j, j].clamp_min(tiny)                                                        # (c,)
        row = ginv[:, j, :] / gjj.unsqueeze(1)                                                     # (c, n+1)
        w -= w[:, :, j:j + 1] * row.unsqueeze(1)
        ginv -= ginv[:, :, j:j + 1] * row.unsqueeze(1)
        alive[j] = False
        order.append(j)
        costs.append(float(total[j]))
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)


@torch.no_grad()
def logit_gram(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(H, d, d) M = Σ_images (QᵀQ) ∘ (KᵀK) per head, for q, k (B, H, N, d): the attention logits lose
    ‖Σ_{i∈S} q_i k_iᵀ‖²_F = 1_Sᵀ M 1_S (summed over images) when the q/k pairs S are removed."""
    q, k = q.double(), k.double()
    return (q.transpose(-1, -2) @ q * (k.transpose(-1, -2) @ k)).sum(0)


@torch.no_grad()
def greedy_pairs(m: torch.Tensor, n_remove: int) -> torch.Tensor:
    """(H, d) removal order (0, 1, ... per head; kept pairs d) of the q/k pairs: each head greedily removes the pair
    whose removal adds least to the logit error 1_Sᵀ M 1_S (M from logit_gram)."""
    H, d, _ = m.shape
    scores = torch.full((H, d), float(d))
    acc = m.diagonal(dim1=1, dim2=2).clone()                 # the cost of adding j: M_jj + 2 Σ_{i∈S} M_ij
    alive = torch.ones(H, d, dtype=torch.bool)
    heads = torch.arange(H)
    for t in range(n_remove):
        j = acc.masked_fill(~alive, float('inf')).argmin(1)  # (H,)
        scores[heads, j] = float(t)
        alive[heads, j] = False
        acc += 2 * m[heads, j]
    return scores


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
    """FFN neurons, value filters, residual-stream channels and q/k pairs chosen by their consumers' error after
    the re-fit (see the module docstring); heads: the built-in criterion. `prune(..., criteria='reconstruction')`
    uses it with prune's own damp and calibration images.

    Args:
        damp: the ridge of (1), relative to the mean diagonal of the Gram (default: the re-fit's).
        block: columns removed per greedy step (1: one at a time).
        groups: which groups it answers for ('mlp', 'v', 'embed', 'qk'); q/k pairs by the logit error
            (logit_gram: the re-fit of q and k, each to its original values, does not compensate it).
        calib, batch: calibration images (as given to prune) for the 'embed' group: the residual-stream channels
            are then chosen jointly for all their consumers (every qkv, fc1 and the head; each consumer's error
            relative to its output energy) from one run of the original model; without them, or for a model of
            another shape, the built-in embed criterion.
    """
    captures = ('fc2_in', 'proj_in')

    def __init__(self, damp: float = DEFAULT_DAMP, block: int = 1, groups: Sequence[str] = ('mlp', 'v', 'embed', 'qk'),
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
        if group.kind == 'qk':
            return self._qk(group)
        return None

    def _qk(self, group: Group) -> Optional[torch.Tensor]:
        attn = getattr(group.module, 'attn', None)
        qkv = group.captured.get('qkv')
        H, d = getattr(attn, 'num_heads', 0), getattr(attn, 'head_dim', 0)
        if qkv is None or not H or qkv.shape[-1] != 3 * H * d:  # (grouped-query or separate q/k/v: not handled)
            return None
        heads = group.heads if group.heads is not None else torch.arange(H)
        if group.shape != (heads.numel(), d):
            return None
        B, N, _ = qkv.shape
        m = 0
        for s in range(0, B, self.batch):
            x = qkv[s:s + self.batch].reshape(-1, N, 3, H, d).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(x[0]), attn.k_norm(x[1])
            idx = heads.to(q.device)
            m = m + logit_gram(q[:, idx], k[:, idx])
        return greedy_pairs(m, d - group.keep).to(qkv.device)

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
