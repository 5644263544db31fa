"""The pruned attention of the Hugging Face family: per-layer head count, q/k width per head and value width,
with the ORIGINAL scaling kept (transformers' attention computes it from its head_dim)."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PrunedHFAttention']


class PrunedHFAttention(nn.Module):
    """Drop-in for transformers' ViTAttention / DeiTAttention / Dinov2Attention (same parameter names: q_proj,
    k_proj, v_proj, o_proj), called as they are and returning (output, None)."""

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scaling: float, qkv_bias: bool = True,
                 o_bias: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = self.num_attention_heads = num_heads
        self.qk_dim, self.v_dim, self.scaling = qk_dim, v_dim, scaling
        self.head_dim = qk_dim  # (what tools read)
        self.is_causal = False
        self.q_proj = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias, **dd)
        self.k_proj = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias, **dd)
        self.v_proj = nn.Linear(dim, num_heads * v_dim, bias=qkv_bias, **dd)
        self.o_proj = nn.Linear(num_heads * v_dim, dim, bias=o_bias, **dd)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scaling={self.scaling:.6g}'

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        B, N, _ = hidden_states.shape
        H = self.num_heads
        q = self.q_proj(hidden_states).view(B, N, H, self.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, N, H, self.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, N, H, self.v_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
        return self.o_proj(x.transpose(1, 2).reshape(B, N, H * self.v_dim)), None
