"""Structural roles shared by the adapters: which tensors of a timm layer produce q, k and v, the FFN
hidden neurons and the branch scales, whatever the layer's layout.

The SNP groups are the same for every layout (docs/METHOD.md): a q/k pair, a value filter, an FFN neuron and
a residual-stream channel. What changes between timm layers is only where their rows live:

  q/k/v   'fused'       attn.qkv, one Linear laid out [q | k | v] (timm Attention, AttentionRope)
          'split_bias'  attn.qkv without bias, plus q_bias, v_bias and a zero k_bias buffer (EvaAttention)
          'separate'    attn.q_proj, attn.k_proj, attn.v_proj
  FFN     Mlp           neuron i = row i of fc1
          GluMlp        neuron i = rows i and h + i of fc1 (the two halves are multiplied)
          SwiGLU        neuron i = row i of fc1_g and of fc1_x
  scales  ls1/ls2.gamma (timm Block LayerScale) or gamma_1/gamma_2 (EvaBlock)
  norms   pre-norm blocks read norm_i(x); post-norm ones (ResPost*) add norm_i(branch(x)) to the stream
  pool    attn_pool (global_pool='map', AttentionPoolLatent) reads the stream through kv's input columns

`PrunedRopeAttention` is the pruned form of timm's rotary-embedding attentions (EvaAttention,
AttentionRope): their parameter layout, their RoPE, the original softmax scale, and a value width
that may differ from the q/k width.
"""
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...slicing import Plan

__all__ = ['attend_and_project', 'qkv_layout', 'qkv_biases', 'qkv_weight', 'qkv_output', 'qkv_plan', 'qkv_fit_parts', 'mlp_hidden',
           'mlp_fc1_rows', 'mlp_in_weight', 'mlp_plan', 'resize_mlp', 'branch_scale', 'scale_names', 'check_mlp',
           'PrunedRopeAttention', 'kv_groups', 'pool_plan', 'pruned_attention_pool', 'is_post_norm', 'branch_input']

# ------------------------------------------------------------------------------------------------
# q / k / v projections

def qkv_layout(attn: nn.Module) -> str:
    if getattr(attn, 'qkv', None) is None:
        return 'separate'
    return 'split_bias' if getattr(attn, 'q_bias', None) is not None else 'fused'


def qkv_weight(attn: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The projection as one fused [q | k | v] (weight, bias) pair, whatever its layout."""
    layout = qkv_layout(attn)
    if layout == 'fused':
        return attn.qkv.weight, attn.qkv.bias
    if layout == 'split_bias':
        return attn.qkv.weight, torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    w = torch.cat([m.weight for m in lins])
    if all(m.bias is None for m in lins):
        return w, None
    return w, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in lins])


def kv_groups(attn: nn.Module) -> int:
    """Query heads per key/value head: > 1 with grouped-query attention (k and v have fewer heads)."""
    kv = getattr(attn, 'num_kv_heads', None) or attn.num_heads
    return attn.num_heads // kv if kv else 1  # (a dropped attention branch has no heads)


def qkv_biases(attn: nn.Module) -> Tuple[bool, bool, bool]:
    """Whether q, k and v have a bias (EvaAttention's separate k_proj has none; its k_bias is a zero buffer)."""
    layout = qkv_layout(attn)
    if layout == 'separate':
        return tuple(getattr(attn, n).bias is not None for n in ('q_proj', 'k_proj', 'v_proj'))
    return (True, False, True) if layout == 'split_bias' else (attn.qkv.bias is not None,) * 3


def qkv_output(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[q | k | v] before any norm or rotation, computed from the attention's input."""
    w, b = qkv_weight(attn)
    return F.linear(x, w, b)


def _linear(plan: Plan, name: str, lin: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    plan[f'{name}.weight'] = [(0, rows), (1, cols)]
    if lin.bias is not None:
        plan[f'{name}.bias'] = [(0, rows)]


def qkv_plan(plan: Plan, prefix: str, attn: nn.Module, q_rows: torch.Tensor, v_rows: torch.Tensor,
             embed: torch.Tensor) -> None:
    """Slices of the q/k/v projection: q_rows index q (and k, the same pairs), v_rows index v, each within
    its own (heads * head_dim) axis; embed indexes the input columns."""
    n = attn.num_heads * attn.head_dim
    layout = qkv_layout(attn)
    if layout == 'separate':
        # grouped-query attention only comes with RoPE, whose q/k are kept whole: k keeps all its rows
        k_rows = q_rows if kv_groups(attn) == 1 else torch.arange(attn.k_proj.out_features)
        for name, rows in (('q_proj', q_rows), ('k_proj', k_rows), ('v_proj', v_rows)):
            _linear(plan, f'{prefix}.{name}', getattr(attn, name), rows, embed)
        return
    _linear(plan, f'{prefix}.qkv', attn.qkv, torch.cat([q_rows, q_rows + n, v_rows + 2 * n]), embed)
    if layout == 'split_bias':
        plan[f'{prefix}.q_bias'] = [(0, q_rows)]
        plan[f'{prefix}.v_bias'] = [(0, v_rows)]


def qkv_fit_parts(attn: nn.Module, n_qk: int, n_v: int, n_k: Optional[int] = None
                  ) -> List[Tuple[str, nn.Linear, torch.Tensor, Callable]]:
    """The Linears a re-fit solves for, each as (name, layer, its columns of the kept [q | k | v] target,
    write-back). Layers that are not a module of `attn` (the split-bias layout) are temporary copies
    that the write-back puts into place; the zero key bias stays zero (timm's EvaAttention has none)."""
    layout = qkv_layout(attn)
    n_k = n_qk if n_k is None else n_k  # fewer k rows than q rows with grouped-query attention
    q, k, v = (torch.arange(a, a + n) for a, n in ((0, n_qk), (n_qk, n_k), (n_qk + n_k, n_v)))
    if layout == 'fused':
        return [('qkv', attn.qkv, torch.arange(n_qk + n_k + n_v), lambda: None)]
    if layout == 'separate':
        return [(name, getattr(attn, name), cols, lambda: None)
                for name, cols in (('q_proj', q), ('k_proj', k), ('v_proj', v))]
    w = attn.qkv.weight
    qv_rows = torch.cat([q, v])
    qv = nn.Linear(w.shape[1], qv_rows.numel(), device=w.device, dtype=w.dtype)
    kk = nn.Linear(w.shape[1], n_qk, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        qv.weight.copy_(w[qv_rows])
        qv.bias.copy_(torch.cat([attn.q_bias, attn.v_bias]))
        kk.weight.copy_(w[k])

    def write_back():
        with torch.no_grad():
            w[qv_rows] = qv.weight
            w[k] = kk.weight
            attn.q_bias.copy_(qv.bias[:n_qk])
            attn.v_bias.copy_(qv.bias[n_qk:])
    return [('qkv', qv, qv_rows, lambda: None), ('qkv.k', kk, k, write_back)]


# ------------------------------------------------------------------------------------------------
# FFN

def check_mlp(mlp: nn.Module, where: str, error) -> None:
    from timm.layers import GluMlp, Mlp, SwiGLU
    if type(mlp) not in (Mlp, GluMlp, SwiGLU) or not isinstance(mlp.fc2, nn.Linear):
        raise error(f'{where} is a {type(mlp).__name__}; supported MLPs: timm Mlp, GluMlp and SwiGLU with Linear '
                    'layers')


def _fc1_parts(mlp: nn.Module) -> List[Tuple[str, int]]:
    """(Linear name, row offset) per role of an FFN neuron: neuron i is row offset + i of each."""
    if hasattr(mlp, 'fc1_g'):
        return [('fc1_g', 0), ('fc1_x', 0)]
    h = mlp_hidden(mlp)
    return [('fc1', 0), ('fc1', h)] if mlp.fc1.out_features == 2 * h else [('fc1', 0)]


def mlp_hidden(mlp: nn.Module) -> int:
    return mlp.fc2.in_features


def mlp_fc1_rows(mlp: nn.Module, sel: torch.Tensor) -> Dict[str, torch.Tensor]:
    """{Linear name: kept rows} for kept neurons `sel`."""
    rows: Dict[str, List[torch.Tensor]] = {}
    for name, off in _fc1_parts(mlp):
        rows.setdefault(name, []).append(sel + off)
    return {k: torch.cat(v) for k, v in rows.items()}


def mlp_in_weight(mlp: nn.Module) -> torch.Tensor:
    """(hidden, parts * in_features): every input weight of each neuron, the rows its redundancy score compares."""
    h = mlp_hidden(mlp)
    parts = [getattr(mlp, n).weight[o:o + h] for n, o in _fc1_parts(mlp)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (one part: no copy of the weight)


def mlp_plan(plan: Plan, prefix: str, mlp: nn.Module, sel: torch.Tensor, embed: torch.Tensor, norm_plan) -> None:
    for name, rows in mlp_fc1_rows(mlp, sel).items():
        _linear(plan, f'{prefix}.{name}', getattr(mlp, name), rows, embed)
    if not isinstance(getattr(mlp, 'norm', nn.Identity()), nn.Identity):
        norm_plan(plan, f'{prefix}.norm', mlp.norm, sel)
    plan[f'{prefix}.fc2.weight'] = [(0, embed), (1, sel)]
    if mlp.fc2.bias is not None:
        plan[f'{prefix}.fc2.bias'] = [(0, embed)]


def resize_mlp(mlp: nn.Module, dim: int, hidden: int, new_linear, resize_norm) -> None:
    """Give an FFN (on the meta device) input/output width `dim` and `hidden` neurons."""
    parts = _fc1_parts(mlp)
    for name in dict(parts):
        old = getattr(mlp, name)
        setattr(mlp, name, new_linear(old, dim, hidden * sum(n == name for n, _ in parts)))
    if not isinstance(getattr(mlp, 'norm', nn.Identity()), nn.Identity):
        resize_norm(mlp.norm, hidden)
    mlp.fc2 = new_linear(mlp.fc2, hidden, dim)


# ------------------------------------------------------------------------------------------------
# branch scales (LayerScale)

def scale_names(blk: nn.Module) -> List[str]:
    """Names of the block's per-channel branch scales (each sliced like the residual stream)."""
    out = [f'{ls}.gamma' for ls in ('ls1', 'ls2') if hasattr(getattr(blk, ls, None), 'gamma')]
    return out + [g for g in ('gamma_1', 'gamma_2') if getattr(blk, g, None) is not None]


def is_post_norm(blk: nn.Module) -> bool:
    """timm's residual post-norm blocks (ResPostBlock, ResPostRelPosBlock): x + norm_i(branch_i(x))."""
    return type(blk).__name__.startswith('ResPost')


def branch_input(blk: nn.Module, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What branch i (1 = attention, 2 = FFN) reads: norm_i of the stream (pre-norm) or the stream itself."""
    return (lambda t: t) if is_post_norm(blk) else getattr(blk, f'norm{i}')


def branch_scale(blk: nn.Module, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What is applied to branch i's output before it is added to the stream: its LayerScale (pre-norm
    blocks; identity without one) or norm_i (post-norm blocks)."""
    if is_post_norm(blk):
        return getattr(blk, f'norm{i}')
    ls = getattr(blk, f'ls{i}', None)
    if ls is not None:
        return ls
    g = getattr(blk, f'gamma_{i}', None)
    return (lambda t: t) if g is None else (lambda t: g * t)


# ------------------------------------------------------------------------------------------------
# pruned attention with rotary position embedding

def attend_and_project(attn: nn.Module, q, k, v, attn_mask, is_causal: bool, gate) -> torch.Tensor:
    """The pruned attentions' shared tail: softmax attention at the module's (original) scale, the norm over the
    value width, the optional output gate, proj. q, k, v: (B, H, N, width per head)."""
    B, H, N, dv = v.shape
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=attn.scale,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.)
    x = attn.norm(x.transpose(1, 2).reshape(B, N, H * dv))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


class PrunedRopeAttention(nn.Module):
    """Pruned form of timm's EvaAttention / AttentionRope: the same parameter names and layout
    (`layout`, see qkv_layout; `qkv_bias`: see qkv_biases), RoPE applied to q and k of the non-prefix
    tokens, the ORIGINAL softmax scale, and value width `v_dim` per head. q/k keep their full width:
    RoPE rotates pairs of q/k dims by position, so snp_fast does not prune them (see prune()).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, v_dim: int, scale: float, layout: str,
                 qkv_bias: Tuple[bool, bool, bool], proj_bias: bool, num_prefix_tokens: int, rotate_half: bool,
                 q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, gate_bias: Optional[bool] = None, attn_drop: float = 0.,
                 proj_drop: float = 0., num_kv_heads: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads, self.head_dim, self.qk_dim, self.v_dim = num_heads, head_dim, head_dim, v_dim
        self.scale = scale
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.num_kv_heads = num_kv_heads or num_heads  # grouped-query attention: k and v have fewer heads
        n_qk, n_v = num_heads * head_dim, self.num_kv_heads * v_dim
        self.qkv = self.q_proj = self.k_proj = self.v_proj = self.q_bias = self.v_bias = None
        self.register_buffer('k_bias', None, persistent=False)
        if layout == 'separate':
            self.q_proj = nn.Linear(dim, n_qk, bias=qkv_bias[0], **dd)
            self.k_proj = nn.Linear(dim, self.num_kv_heads * head_dim, bias=qkv_bias[1], **dd)
            self.v_proj = nn.Linear(dim, n_v, bias=qkv_bias[2], **dd)
        else:
            self.qkv = nn.Linear(dim, 2 * n_qk + n_v, bias=layout == 'fused' and qkv_bias[0], **dd)
            if layout == 'split_bias':
                self.q_bias = nn.Parameter(torch.zeros(n_qk, **dd))
                self.register_buffer('k_bias', torch.zeros(n_qk, **dd), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(n_v, **dd))
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.gate = nn.Linear(dim, num_heads * v_dim, bias=gate_bias, **dd) if gate_bias is not None else None
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}'

    def init_non_persistent_buffers(self) -> None:
        if self.k_bias is not None:
            self.k_bias.zero_()

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        from timm.layers import apply_rot_embed_cat
        B, N, _ = x.shape
        H, Hkv, d, dv = self.num_heads, self.num_kv_heads, self.head_dim, self.v_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = qkv_output(self, x).split([H * d, Hkv * d, Hkv * dv], dim=-1)
        q, k = self.q_norm(q.view(B, N, H, d).transpose(1, 2)), self.k_norm(k.view(B, N, Hkv, d).transpose(1, 2))
        v = v.view(B, N, Hkv, dv).transpose(1, 2)
        if rope is not None:
            npt = self.num_prefix_tokens
            q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=self.rotate_half)],
                              dim=2).type_as(v) for t in (q, k))
        if Hkv != H:  # query head h uses key/value head h // (H / Hkv), as in timm
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        return attend_and_project(self, q, k, v, attn_mask, is_causal, gate)


# ------------------------------------------------------------------------------------------------
# attention-pooling head (global_pool='map')

def pool_plan(plan: Plan, prefix: str, pool: nn.Module, embed: torch.Tensor) -> None:
    """The pool reads the residual stream through kv (and its optional pos_embed): those input columns
    go with the stream; its latent query, internal width, proj, norm and MLP keep their size, so the
    classifier after it is not sliced."""
    plan[f'{prefix}.kv.weight'] = [(1, embed)]
    if getattr(pool, 'pos_embed', None) is not None:
        plan[f'{prefix}.pos_embed'] = [(1, embed)]


def pruned_attention_pool(pool: nn.Module, dim: int, new_linear) -> nn.Module:
    """Turn timm's AttentionPoolLatent (on the meta device) into one that reads a `dim`-wide stream.

    Only kv's input (and pos_embed) narrow. timm's forward reshapes the attention output to the INPUT
    width, which no longer equals the pool's internal width, so the module's class becomes
    PrunedAttentionPoolLatent: a subclass with the same parameters and attributes whose forward reshapes
    to num_heads * head_dim instead.
    """
    pool.kv = new_linear(pool.kv, dim, pool.kv.out_features)
    if getattr(pool, 'pos_embed', None) is not None:
        pe = pool.pos_embed
        pool.pos_embed = nn.Parameter(torch.empty(pe.shape[0], dim, device='meta', dtype=pe.dtype),
                                      requires_grad=pe.requires_grad)
    pool.__class__ = _pruned_pool_class()
    return pool


@functools.lru_cache(maxsize=None)
def _pruned_pool_class() -> type:
    from timm.layers import AttentionPoolLatent

    class PrunedAttentionPoolLatent(AttentionPoolLatent):
        def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            B, N, _ = x.shape
            if self.pos_embed is not None:
                x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
            H, d, L = self.num_heads, self.head_dim, self.latent_len
            q = self.q(self.latent.expand(B, -1, -1)).reshape(B, L, H, d).transpose(1, 2)
            k, v = self.kv(x).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, L, H * d)))
            if self.mlp is not None:
                x = x + self.mlp(self.norm(x))
            return x[:, 0] if self.pool == 'token' else x.mean(1) if self.pool == 'avg' else x

    return PrunedAttentionPoolLatent
