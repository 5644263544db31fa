"""The pruned attention layers of the ViT family: q/k width per head may differ from the value width, and
the ORIGINAL softmax scale is kept (timm's fused attention would otherwise recompute it from the head width)."""
from typing import Optional

import torch
import torch.nn as nn

from ...slicing import quiet_zero_init
from . import roles

__all__ = ['PrunedAttention', 'PrunedRelPosAttention']


class PrunedAttention(nn.Module):
    """Multi-head self-attention whose query/key width per head (qk_dim) may differ from its value
    width (v_dim), with the ORIGINAL softmax scale kept (pruning q/k dims must not change it).

    Parameter names match timm's Attention (qkv laid out [q | k | v], head-major), so state dicts and
    tooling carry over.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, q_norm: Optional[nn.Module] = None, k_norm: Optional[nn.Module] = None,
                 norm: Optional[nn.Module] = None, gate_bias: Optional[bool] = None, attn_drop: float = 0.,
                 proj_drop: float = 0., dim_out: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.head_dim = qk_dim  # timm tools read attn.head_dim
        self.scale = scale
        with quiet_zero_init():  # num_heads = 0 (attention dropped): zero-width qkv, gate and proj
            self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias, **dd)
            self.gate = nn.Linear(dim, num_heads * v_dim, bias=gate_bias, **dd) if gate_bias is not None else None
            self.proj = nn.Linear(num_heads * v_dim, dim_out or dim, bias=proj_bias, **dd)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm if norm is not None else nn.Identity()
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **kwargs) -> torch.Tensor:
        unknown = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        if unknown:
            raise TypeError(f'PrunedAttention got keyword arguments it cannot honour: {sorted(unknown)}')
        B, N, _ = x.shape
        H, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        if H == 0:  # dropped branch: the zero-width limit, whose output is proj's bias (a constant)
            return self.proj_drop(self.proj(x.new_zeros(B, N, 0)))
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).split([H * dqk, H * dqk, H * dv], dim=-1)
        q = self.q_norm(q.view(B, N, H, dqk).transpose(1, 2))
        k = self.k_norm(k.view(B, N, H, dqk).transpose(1, 2))
        v = v.view(B, N, H, dv).transpose(1, 2)
        return roles.attend_and_project(self, q, k, v, attn_mask, is_causal, gate)


class PrunedRelPosAttention(PrunedAttention):
    """PrunedAttention plus timm RelPosAttention's relative-position bias on the attention logits (its own
    rel_pos module, or the model's shared one passed as shared_rel_pos). The bias depends on neither the
    q/k nor the v dims, so it is kept as is."""

    def __init__(self, *args, rel_pos: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rel_pos = rel_pos

    def forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        return super().forward(x, attn_mask=bias)
