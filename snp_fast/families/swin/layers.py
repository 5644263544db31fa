"""The pruned window attention of the Swin family: q/k width per head may differ from the value width, the
relative-position bias table keeps one column per kept head (whole: it depends on neither width), and the
ORIGINAL softmax scale is kept."""
from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['PrunedWindowAttention']


class PrunedWindowAttention(nn.Module):
    """timm WindowAttention (W-MSA / SW-MSA with a relative-position bias per head) whose query/key width per
    head (qk_dim) may differ from its value width (v_dim), with the ORIGINAL scale kept.

    Parameter and buffer names match timm's WindowAttention (qkv laid out [q | k | v], head-major;
    relative_position_bias_table (table rows, heads); relative_position_index, not persistent), so state dicts
    and SwinTransformerBlock's forward carry over. The attention is computed as explicit products (timm's
    non-fused path), which is also what exports to ONNX.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float,
                 window_size: Tuple[int, int], qkv_bias: bool = True, attn_drop: float = 0., proj_drop: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.dim = dim
        self.window_size = tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.head_dim = qk_dim  # timm tools read attn.head_dim
        self.scale = scale
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads,
                                                                     **dd))
        self.register_buffer('relative_position_index',
                             torch.empty(self.window_area, self.window_area, device=device, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        if self.relative_position_index.device.type != 'meta':
            self.init_non_persistent_buffers()

    def extra_repr(self) -> str:
        return (f'heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, scale={self.scale:.6g}, '
                f'window={self.window_size}')

    def init_non_persistent_buffers(self) -> None:
        from timm.models.swin_transformer import get_relative_position_index
        self.relative_position_index.copy_(get_relative_position_index(
            *self.window_size, device=self.relative_position_index.device))

    def set_window_size(self, window_size) -> None:
        if tuple(window_size) != self.window_size:
            raise NotImplementedError('changing the window size of a pruned Swin is not supported')

    def _get_rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        H, dqk, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([H * dqk, H * dqk, H * dv], dim=-1)
        q = q.view(B_, N, H, dqk).transpose(1, 2) * self.scale
        k = k.view(B_, N, H, dqk).transpose(1, 2)
        v = v.view(B_, N, H, dv).transpose(1, 2)
        attn = q @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, H, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, H * dv)
        return self.proj_drop(self.proj(x))
