"""SNP adapter for timm `VisionTransformer` (ViT, DeiT, distilled DeiT, DeiT-3, register tokens) and timm
`Eva` (EVA-02, DINOv3, RoPE-ViT, PE; the per-layout details live in roles.py).

The adapter knows the family's structure, so it builds the coupled groups of SNP.md directly (no
tracing): per block a query/key group, a value group and an FFN group, and one residual-stream
(embedding) group that couples every tensor reading or writing the stream. It turns a selection of
kept indices into one slicing plan ({parameter name: [(dim, kept index)]}) and turns a meta-device
copy of the model into the smaller architecture that the sliced tensors are loaded into.

Note: with timm's scale_attn_norm / scale_mlp_norm (a LayerNorm over the value or FFN hidden width),
removing v or fc1 filters changes that norm's statistics, so such models have no exact masked twin
(like embedding pruning); the re-fit compensates.
"""
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import roles

__all__ = ['BlockDims', 'ModelDims', 'BlockSelection', 'Selection', 'PrunedAttention', 'check_supported',
           'model_dims', 'apply_dims', 'slice_plan', 'block_plan', 'stem_and_head_plan', 'SUPPORTED',
           'UnsupportedModelError']

SUPPORTED = ('timm VisionTransformer / VisionTransformerDistilled built from the standard Block and Attention '
             'layers (vit_*, deit_*, deit3_*, *_distilled, register-token and class_token=False variants), '
             'VisionTransformerRelPos (vit_relpos_*, vit_srelpos_*), pre-norm or residual post-norm (ResPost*) blocks, '
             'timm Eva (EvaBlock with EvaAttention / AttentionRope: EVA-02, DINOv3, RoPE-ViT, PE; q/k kept whole), '
             'with Mlp, GluMlp or SwiGLU FFNs and a token, average or attention-pooling ("map") head')

Slice = Tuple[int, torch.Tensor]
Plan = Dict[str, List[Slice]]


class UnsupportedModelError(TypeError):
    """The model (or one of its layers) is not of a family snp_fast knows how to prune."""


@dataclass
class BlockDims:
    heads: int
    qk: int     # query/key width per head
    v: int      # value width per head
    mlp: int    # fc1 hidden neurons


@dataclass
class ModelDims:
    embed: int
    blocks: List[BlockDims]

    def to_dict(self) -> dict:
        return {'embed': self.embed, 'blocks': [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'ModelDims':
        return cls(embed=int(d['embed']), blocks=[BlockDims(**{k: int(v) for k, v in b.items()}) for b in d['blocks']])


@dataclass
class BlockSelection:
    qk: torch.Tensor   # (kept heads, kept q/k dims per head), int64, sorted per head; dims index within a head
    v: torch.Tensor    # (kept heads, kept v dims per head)
    mlp: torch.Tensor  # (kept fc1 neurons,); empty = the MLP branch is dropped
    heads: Optional[torch.Tensor] = None  # kept ORIGINAL head indices, sorted; None = all heads; empty = attn dropped

    def head_index(self) -> torch.Tensor:
        return torch.arange(self.qk.shape[0]) if self.heads is None else self.heads


@dataclass
class Selection:
    embed: torch.Tensor             # kept residual-stream channels
    blocks: List[BlockSelection]

    def dims(self) -> ModelDims:
        return ModelDims(self.embed.numel(), [BlockDims(b.qk.shape[0], b.qk.shape[1], b.v.shape[1], b.mlp.numel())
                                              for b in self.blocks])

    def to_dict(self) -> dict:
        return {'embed': self.embed.tolist(),
                'blocks': [{'heads': b.head_index().tolist(), 'qk': b.qk.tolist(), 'v': b.v.tolist(),
                            'mlp': b.mlp.tolist()} for b in self.blocks]}

    @classmethod
    def from_dict(cls, d: dict) -> 'Selection':
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        blocks = []
        for b in d['blocks']:
            heads = t(b['heads']) if 'heads' in b else None  # recipes before head pruning: all heads
            n = len(b['qk'])
            # a dropped attention has (0, 0) selections, which JSON stores as []
            per_head = lambda x: t(x).reshape(len(x), -1) if n else torch.zeros(0, 0, dtype=torch.long)  # noqa: E731
            blocks.append(BlockSelection(per_head(b['qk']), per_head(b['v']), t(b['mlp']), heads))
        return cls(t(d['embed']), blocks)


@contextmanager
def _quiet_zero_init():
    """Zero-width layers (a dropped branch) are legal; torch's init warns that initialising them is a no-op."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Initializing zero-element tensors is a no-op')
        yield


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
        with _quiet_zero_init():  # num_heads = 0 (attention dropped): zero-width qkv, gate and proj
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


# ------------------------------------------------------------------------------------------------
# structure checks and dims

def _timm_classes():
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer
    return VisionTransformer, Block, Attention, Mlp


def _relpos_classes():
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, VisionTransformerRelPos
    return VisionTransformerRelPos, RelPosBlock, RelPosAttention


def _eva_classes():
    from timm.layers.attention import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    return Eva, EvaBlock, (EvaAttention, AttentionRope)


def is_eva(model: nn.Module) -> bool:
    """timm's Eva family (EVA-02, DINOv3, RoPE-ViT, PE, ...: vit_* names built by timm/models/eva.py)."""
    return isinstance(model, _eva_classes()[0])


def check_supported(model: nn.Module, allow_pruned: bool = False) -> None:
    """Raise UnsupportedModelError naming what is supported unless `model` is a plain timm ViT or Eva."""
    VisionTransformer, Block, Attention, Mlp = _timm_classes()
    Eva, EvaBlock, rope_attns = _eva_classes()
    RelPos, RelPosBlock, RelPosAttention = _relpos_classes()
    eva, relpos = isinstance(model, Eva), isinstance(model, RelPos)
    if not (eva or relpos or isinstance(model, VisionTransformer)):
        raise UnsupportedModelError(f'{type(model).__name__} is not supported; snp_fast prunes {SUPPORTED}')
    pool = getattr(model, 'attn_pool', None)
    pools = ('AttentionPoolLatent', 'PrunedAttentionPoolLatent') if allow_pruned else ('AttentionPoolLatent',)
    if pool is not None and type(pool).__name__ not in pools:
        raise UnsupportedModelError(f'global_pool={model.global_pool!r} ({type(pool).__name__} head) is not supported; '
                                    f'snp_fast prunes {SUPPORTED} (global_pool="map": AttentionPoolLatent)')
    if not isinstance(getattr(model.patch_embed, 'proj', None), nn.Conv2d):
        raise UnsupportedModelError(f'patch embedding {type(model.patch_embed).__name__} without a Conv2d proj '
                                    'is not supported')
    from timm.models.vision_transformer import ResPostBlock
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock
    block_types, attn_types, pruned_type = (
        ((EvaBlock,), rope_attns, roles.PrunedRopeAttention) if eva else
        ((RelPosBlock, ResPostRelPosBlock), (RelPosAttention,), PrunedRelPosAttention) if relpos else
        ((Block, ResPostBlock), (Attention,), PrunedAttention))
    attn_types = attn_types + (pruned_type,) if allow_pruned else attn_types
    for i, blk in enumerate(model.blocks):
        if type(blk) not in block_types:
            raise UnsupportedModelError(f'blocks.{i} is a {type(blk).__name__}; only timm '
                                        f'{" / ".join(t.__name__ for t in block_types)} is supported in a '
                                        f'{type(model).__name__} ({SUPPORTED})')
        if type(blk.attn) not in attn_types:
            what = 'already pruned (re-pruning is not supported)' if isinstance(blk.attn, pruned_type) \
                else f'a {type(blk.attn).__name__}'
            raise UnsupportedModelError(f'blocks.{i}.attn is {what}; only timm '
                                        f'{" / ".join(t.__name__ for t in attn_types)} is supported')
        roles.check_mlp(blk.mlp, f'blocks.{i}.mlp', UnsupportedModelError)


def _attn_dims(attn: nn.Module) -> Tuple[int, int, int]:
    if isinstance(attn, (PrunedAttention, roles.PrunedRopeAttention)):  # (PrunedRelPosAttention included)
        return attn.num_heads, attn.qk_dim, attn.v_dim
    return attn.num_heads, attn.head_dim, attn.head_dim


def model_dims(model: nn.Module) -> ModelDims:
    blocks = []
    for blk in model.blocks:
        h, qk, v = _attn_dims(blk.attn)
        blocks.append(BlockDims(h, qk, v, roles.mlp_hidden(blk.mlp)))
    return ModelDims(model.embed_dim, blocks)


def has_qk_norm(model: nn.Module) -> bool:
    return any(not isinstance(b.attn.q_norm, nn.Identity) for b in model.blocks)


def fixed_qk_reason(model: nn.Module) -> str:
    """Why the q/k dims of `model` cannot be pruned ('' when they can).

    RoPE rotates each pair of q/k dims by the token's position, so a dim is not an independent rank-1
    term of QKᵀ; pruning whole rotation pairs (and slicing the rotation tables per block) is possible
    but not implemented: like qk_norm models, RoPE models keep q/k whole (v, fc1, embed are pruned).
    """
    if is_eva(model):
        return 'this model rotates q and k by position (RoPE, timm Eva family)'
    if has_qk_norm(model):
        return 'this model normalises q and k per head (qk_norm)'
    return ''


# ------------------------------------------------------------------------------------------------
# slicing plan: {parameter name: [(dim, kept index)]}

def _head_rows(sel: torch.Tensor, head_dim: int, offset: int = 0, heads: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """(kept heads, kept) per-head indices -> flat row indices into a head-major (H*head_dim) axis.

    `heads`: the original index of each row of `sel` (None: rows are heads 0..H-1)."""
    if heads is None:
        heads = torch.arange(sel.shape[0], dtype=torch.long)
    return (heads.long().unsqueeze(1) * head_dim + sel + offset).flatten()


def value_out_cols(attn: nn.Module, sel: BlockSelection, head_dim: int) -> torch.Tensor:
    """The kept columns of the attention's output (H·d_v wide: proj's input, the output gate's rows and its
    norm). With grouped-query attention each value head's kept filters repeat for its query heads."""
    g = roles.kv_groups(attn)
    if g == 1:
        return _head_rows(sel.v, head_dim, heads=sel.heads)
    return _head_rows(sel.v.repeat_interleave(g, 0), head_dim)


def _norm_plan(plan: Plan, prefix: str, module: nn.Module, idx: torch.Tensor) -> None:
    for p in ('weight', 'bias'):
        if getattr(module, p, None) is not None:
            plan[f'{prefix}.{p}'] = [(0, idx)]


def _linear_plan(plan: Plan, prefix: str, module: nn.Linear, out_idx: Optional[torch.Tensor],
                 in_idx: Optional[torch.Tensor]) -> None:
    w = [(d, i) for d, i in ((0, out_idx), (1, in_idx)) if i is not None]
    if w:
        plan[f'{prefix}.weight'] = w
    if module.bias is not None and out_idx is not None:
        plan[f'{prefix}.bias'] = [(0, out_idx)]


def stem_and_head_plan(model: nn.Module, embed: torch.Tensor) -> Plan:
    """Slices of every tensor outside the blocks that touches the residual stream."""
    plan: Plan = {}
    plan['patch_embed.proj.weight'] = [(0, embed)]
    if model.patch_embed.proj.bias is not None:
        plan['patch_embed.proj.bias'] = [(0, embed)]
    if not isinstance(getattr(model.patch_embed, 'norm', nn.Identity()), nn.Identity):
        _norm_plan(plan, 'patch_embed.norm', model.patch_embed.norm, embed)
    for tok in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        if getattr(model, tok, None) is not None:
            plan[tok] = [(2, embed)]
    # an attention-pooling head reads the stream through its kv; fc_norm and the classifier read its output
    pool = getattr(model, 'attn_pool', None)
    if pool is not None:
        roles.pool_plan(plan, 'attn_pool', pool, embed)
    for name in ('norm_pre', 'norm') + (('fc_norm',) if pool is None else ()):
        mod = getattr(model, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            _norm_plan(plan, name, mod, embed)
    for name in ('head', 'head_dist') if pool is None else ():
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            _linear_plan(plan, name, mod, None, embed)
    return plan


def block_plan(model: nn.Module, i: int, sel: BlockSelection, embed: torch.Tensor) -> Plan:
    """Slices of every tensor of block i (q/k, v, fc1 groups and its share of the stream group)."""
    blk = model.blocks[i]
    attn = blk.attn
    h, d_qk, d_v = _attn_dims(attn)
    if d_qk != d_v:
        raise UnsupportedModelError(f'blocks.{i}.attn is already pruned; re-pruning is not supported')
    d = d_qk
    p = f'blocks.{i}'
    q_rows = _head_rows(sel.qk, d, heads=sel.heads)
    v_rows, v_cols = _head_rows(sel.v, d, heads=sel.heads), value_out_cols(attn, sel, d)
    plan: Plan = {}
    _norm_plan(plan, f'{p}.norm1', blk.norm1, embed)
    _norm_plan(plan, f'{p}.norm2', blk.norm2, embed)
    roles.qkv_plan(plan, f'{p}.attn', attn, q_rows, v_rows, embed)
    if not isinstance(getattr(attn, 'norm', nn.Identity()), nn.Identity):
        _norm_plan(plan, f'{p}.attn.norm', attn.norm, v_cols)
    if getattr(attn, 'gate', None) is not None:
        _linear_plan(plan, f'{p}.attn.gate', attn.gate, v_cols, embed)
    _linear_plan(plan, f'{p}.attn.proj', attn.proj, embed, v_cols)
    for name in roles.scale_names(blk):
        plan[f'{p}.{name}'] = [(0, embed)]
    roles.mlp_plan(plan, f'{p}.mlp', blk.mlp, sel.mlp, embed, _norm_plan)
    return plan


def slice_plan(model: nn.Module, sel: Selection) -> Plan:
    plan = stem_and_head_plan(model, sel.embed)
    for i, bs in enumerate(sel.blocks):
        plan.update(block_plan(model, i, bs, sel.embed))
    return plan


# ------------------------------------------------------------------------------------------------
# architecture change (on a meta-device copy)

def _resize_norm(mod: nn.Module, n: int) -> None:
    if hasattr(mod, 'normalized_shape'):
        mod.normalized_shape = (n,)
    for p in ('weight', 'bias'):
        t = getattr(mod, p, None)
        if t is not None:
            setattr(mod, p, nn.Parameter(torch.empty(n, device='meta', dtype=t.dtype), requires_grad=t.requires_grad))


def _new_linear(old: nn.Linear, in_f: int, out_f: int) -> nn.Linear:
    with _quiet_zero_init():  # fc1/fc2 of a dropped MLP branch have zero width
        return nn.Linear(in_f, out_f, bias=old.bias is not None, device='meta', dtype=old.weight.dtype)


def _new_param(old: torch.Tensor, shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device='meta', dtype=old.dtype), requires_grad=old.requires_grad)


def _unsupported(bd: 'BlockDims', od: 'BlockDims') -> str:
    """What a target asks of an attention that only some attentions support, in the user's terms."""
    if bd.heads == 0:
        return 'dropping the attention branch (drop_attn)'
    if bd.heads != od.heads:
        return "head pruning (ratio 'heads')"
    return "q/k pruning (ratio 'qk')"


def apply_dims(model: nn.Module, dims: ModelDims) -> nn.Module:
    """Turn a (meta-device) copy of the ORIGINAL model into the pruned architecture, in place.

    Attention layers become PrunedAttention (original scale kept); Linear, Conv2d, norms, tokens and
    LayerScale get their new sizes. Parameters are left on the meta device for the caller to assign.
    """
    D = dims.embed
    orig = model_dims(model)
    if len(dims.blocks) != len(orig.blocks):
        raise ValueError(f'dims describe {len(dims.blocks)} blocks but the model has {len(orig.blocks)}')
    pe = model.patch_embed
    old = pe.proj
    pe.proj = nn.Conv2d(old.in_channels, D, old.kernel_size, old.stride, old.padding, bias=old.bias is not None,
                        device='meta', dtype=old.weight.dtype)
    if not isinstance(getattr(pe, 'norm', nn.Identity()), nn.Identity):
        _resize_norm(pe.norm, D)
    for tok in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
        t = getattr(model, tok, None)
        if t is not None:
            setattr(model, tok, _new_param(t, (*t.shape[:2], D)))
    pool = getattr(model, 'attn_pool', None)
    if pool is not None:
        roles.pruned_attention_pool(pool, D, _new_linear)
    for name in ('norm_pre', 'norm') + (('fc_norm',) if pool is None else ()):
        mod = getattr(model, name, None)
        if mod is not None and not isinstance(mod, nn.Identity):
            _resize_norm(mod, D)
    for name in ('head', 'head_dist') if pool is None else ():
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            setattr(model, name, _new_linear(mod, D, mod.out_features))
    for i, (blk, bd, od) in enumerate(zip(model.blocks, dims.blocks, orig.blocks)):
        # heads = 0 (then qk = v = 0) drops the attention branch, mlp = 0 the MLP branch: the zero-width limit
        if not 0 <= bd.heads <= od.heads:
            raise ValueError(f'blocks.{i}: {bd.heads} heads outside [0, {od.heads}]')
        lo = 1 if bd.heads else 0
        for lim, val, what in ((od.qk, bd.qk, 'qk'), (od.v, bd.v, 'v')):
            if not lo <= val <= (lim if bd.heads else 0):
                raise ValueError(f'blocks.{i}: {what} width {val} outside [{lo}, {lim if bd.heads else 0}] '
                                 f'with {bd.heads} heads')
        if not 0 <= bd.mlp <= od.mlp:
            raise ValueError(f'blocks.{i}: mlp width {bd.mlp} outside [0, {od.mlp}]')
        if bd.mlp == 0 and not isinstance(blk.mlp.norm, nn.Identity):
            raise ValueError(f'blocks.{i}: the MLP branch of a model with scale_mlp_norm cannot be dropped')
        _resize_norm(blk.norm1, D)
        _resize_norm(blk.norm2, D)
        a = blk.attn
        q_norm = a.q_norm if not isinstance(a.q_norm, nn.Identity) else None
        k_norm = a.k_norm if not isinstance(a.k_norm, nn.Identity) else None
        if (q_norm is not None or k_norm is not None) and bd.heads and bd.qk != od.qk:
            raise ValueError(f'blocks.{i}: q/k pruning of a model with qk_norm is not supported')
        norm = None
        if not isinstance(getattr(a, 'norm', nn.Identity()), nn.Identity):
            norm = a.norm
            _resize_norm(norm, bd.heads * bd.v)
        gate = getattr(a, 'gate', None)
        gate_bias = None if gate is None else gate.bias is not None
        if hasattr(a, 'num_prefix_tokens'):  # timm's rotary attentions (Eva family)
            if bd.heads != od.heads or bd.qk != od.qk:
                raise ValueError(f'blocks.{i}: {_unsupported(bd, od)} of a RoPE attention is not supported')
            blk.attn = roles.PrunedRopeAttention(
                D, bd.heads, bd.qk, bd.v, scale=float(a.scale), layout=roles.qkv_layout(a),
                qkv_bias=roles.qkv_biases(a),
                proj_bias=a.proj.bias is not None, num_prefix_tokens=a.num_prefix_tokens,
                rotate_half=bool(getattr(a, 'rotate_half', False)), q_norm=q_norm, k_norm=k_norm, norm=norm,
                gate_bias=gate_bias, attn_drop=a.attn_drop.p, proj_drop=a.proj_drop.p,
                num_kv_heads=getattr(a, 'num_kv_heads', None), device='meta', dtype=a.proj.weight.dtype)
        else:
            relpos = {'rel_pos': a.rel_pos} if hasattr(a, 'rel_pos') else {}
            if relpos and bd.heads != od.heads:
                raise ValueError(f'blocks.{i}: {_unsupported(bd, od)} of a relative-position attention is not supported')
            blk.attn = (PrunedRelPosAttention if relpos else PrunedAttention)(
                D, bd.heads, bd.qk, bd.v, scale=float(a.scale), qkv_bias=a.qkv.bias is not None,
                proj_bias=a.proj.bias is not None, q_norm=q_norm, k_norm=k_norm, norm=norm, gate_bias=gate_bias,
                attn_drop=a.attn_drop.p, proj_drop=a.proj_drop.p, device='meta', dtype=a.qkv.weight.dtype, **relpos)
        for ls in ('ls1', 'ls2'):
            mod = getattr(blk, ls, None)
            if hasattr(mod, 'gamma'):
                mod.gamma = _new_param(mod.gamma, (D,))
        for g in ('gamma_1', 'gamma_2'):
            if getattr(blk, g, None) is not None:
                setattr(blk, g, _new_param(getattr(blk, g), (D,)))
        roles.resize_mlp(blk.mlp, D, bd.mlp, _new_linear, _resize_norm)
    model.embed_dim = model.num_features = D
    if hasattr(model, 'head_hidden_size') and pool is None:  # an attention pool keeps its output width
        model.head_hidden_size = D
    for fi in getattr(model, 'feature_info', []) or []:
        if isinstance(fi, dict) and 'num_chs' in fi:
            fi['num_chs'] = D
    return model
