"""Attention maps of the original vs the pruned model (like Figure 3 of the SNP paper).

For a few blocks, the attention of the CLS token over the image patches, averaged over heads, from one
image. The maps are computed here from the output of each block's `attn.qkv` (captured with forward
hooks), with each module's own q_norm/k_norm and softmax scale: for timm's Attention the width per
head is head_dim for q, k and v; for snp_fast.PrunedAttention q/k have qk_dim and v has v_dim per
head, and the scale is the original one. Models without a class token use the mean attention each patch
receives. Written with matplotlib's Agg backend (no display needed).
"""
import io
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['attention_maps', 'plot_attention', 'default_blocks']


def _split(attn: nn.Module, qkv: torch.Tensor):
    B, N, _ = qkv.shape
    H = attn.num_heads
    dqk = getattr(attn, 'qk_dim', None) or attn.head_dim
    dv = getattr(attn, 'v_dim', None) or attn.head_dim
    q, k, _v = qkv.split([H * dqk, H * dqk, H * dv], dim=-1)
    q = attn.q_norm(q.reshape(B, N, H, dqk).transpose(1, 2))
    k = attn.k_norm(k.reshape(B, N, H, dqk).transpose(1, 2))
    return q, k


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, blocks: Optional[Sequence[int]] = None
                   ) -> Dict[int, torch.Tensor]:
    """{block index: (grid_h, grid_w) attention of the CLS token over patches, mean over heads}."""
    model = model.eval()
    depth = len(model.blocks)
    blocks = list(range(depth)) if blocks is None else list(blocks)
    captured: Dict[int, torch.Tensor] = {}
    hooks = []
    for i in blocks:
        def hook(_m, _inp, out, i=i):
            captured[i] = out.detach()
        hooks.append(model.blocks[i].attn.qkv.register_forward_hook(hook))
    p = next(model.parameters())
    x = image.unsqueeze(0) if image.dim() == 3 else image[:1]
    try:
        model(x.to(p.device, p.dtype))
    finally:
        for h in hooks:
            h.remove()
    npre = getattr(model, 'num_prefix_tokens', 1)
    gh, gw = model.patch_embed.grid_size
    out = {}
    for i in blocks:
        attn = model.blocks[i].attn
        q, k = _split(attn, captured[i].float())
        a = torch.softmax((q @ k.transpose(-2, -1)) * float(attn.scale), dim=-1)[0]   # (H, N, N)
        if getattr(model, 'cls_token', None) is not None:
            m = a[:, 0, npre:].mean(0)
        else:
            m = a[:, npre:, npre:].mean(dim=(0, 1))
        out[i] = m.reshape(gh, gw).cpu()
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else float('nan')


def default_blocks(depth: int, n: int = 4) -> List[int]:
    if depth <= n:
        return list(range(depth))
    return sorted({round(j * (depth - 1) / (n - 1)) for j in range(n)})


def plot_attention(original: nn.Module, pruned: nn.Module, image: torch.Tensor, path: Optional[str] = None,
                   blocks: Optional[Sequence[int]] = None, title: Optional[str] = None) -> bytes:
    """PNG (returned as bytes, and written to `path` if given): the image, then per block the original
    and pruned CLS attention maps (rows: original, pruned; one colour scale per block) with the Pearson
    correlation r of each pair over the patches."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    from .calib import denormalize
    live = [i for i, b in enumerate(pruned.blocks) if getattr(b.attn, 'num_heads', 1) > 0]  # (drop_attn: none)
    if blocks is None:
        blocks = [live[j] for j in default_blocks(len(live))]
    dropped = sorted(set(blocks) - set(live))
    if dropped or not blocks:
        raise ValueError(f'no attention to draw in blocks {dropped} of the pruned model (their attention branch was '
                         'dropped)' if dropped else 'no attention to draw: every attention branch of the pruned model '
                         'was dropped')
    mo = attention_maps(original, image, blocks)
    mp = attention_maps(pruned, image, blocks)
    img = denormalize(image if image.dim() == 3 else image[0], original)
    img = img.permute(1, 2, 0).numpy() if img.shape[0] != 1 else img[0].numpy()
    ncol = len(blocks) + 1
    fig, axes = plt.subplots(2, ncol, figsize=(2.4 * ncol, 5.0), squeeze=False)
    for r, (label, maps) in enumerate((('original', mo), ('pruned', mp))):
        ax = axes[r][0]
        ax.imshow(img, cmap=None if img.ndim == 3 else 'gray')
        ax.set_title(label if r == 0 else 'pruned', fontsize=9)
        ax.axis('off')
        for c, i in enumerate(blocks, start=1):
            ax = axes[r][c]
            ax.imshow(img, cmap=None if img.ndim == 3 else 'gray', alpha=0.35,
                      extent=(0, maps[i].shape[1], maps[i].shape[0], 0))
            lo, hi = min(mo[i].min().item(), mp[i].min().item()), max(mo[i].max().item(), mp[i].max().item())
            ax.imshow(maps[i].numpy(), cmap='inferno', alpha=0.75, extent=(0, maps[i].shape[1], maps[i].shape[0], 0),
                      interpolation='nearest', vmin=lo, vmax=hi)
            if r == 0:
                ax.set_title(f'block {i}', fontsize=9)
            else:
                ax.set_title(f'block {i} (r = {_pearson(mo[i], mp[i]):.2f})', fontsize=9)
            ax.axis('off')
    fig.suptitle(title or 'CLS-token attention over patches (mean over heads): original vs pruned', fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        with open(path, 'wb') as f:
            f.write(data)
    return data
