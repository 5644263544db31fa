"""Quality of pruned models on held-out data, and a comparison of SNP with baselines at equal MACs.

    python -m research.quality            # full comparison on the shipped digits ViT -> QUALITY.md
    python -m research.quality --quick    # a small subset, printed (or --out PATH)

Metrics (all on held-out images, original model vs pruned model):
  * top-1 accuracy of the pruned model, and top-1 agreement with the original's predictions;
  * logit KL: mean over images of KL(softmax(original logits) || softmax(pruned logits));
  * attention-map fidelity per block: the softmax attention maps A (original) and A' (pruned),
    recomputed from forward hooks on every block's attn.qkv output with that attention module's own
    `scale` (timm Attention: num_heads, head_dim; snp_fast.PrunedAttention: num_heads, qk_dim, v_dim):
      - relative Frobenius error ‖A − A'‖_F / ‖A‖_F over all images, heads and rows of the block;
      - KL: mean over images, heads and query rows of KL(A_row || A'_row).

Baselines get exactly the per-block dims of the SNP model (so equal params and MACs). Selections that
prune() does not offer (random, L1 magnitude) are built here as a ViT Selection and go through prune()'s
own slicing and re-fit: `snp_fast.prune(model, calib, selection=<Selection>, refit=...)`.
"""
import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from snp_fast import prune
from snp_fast.families import vit
from snp_fast.families.vit import BlockSelection, ModelDims, Selection, resolve_ratios, roles, target_dims
from snp_fast.macs import count_macs, meta_copy
from snp_fast.refit import DEFAULT_DAMP
from snp_fast.scores import select_per_head, select_top, tss_average

# the module, not the function snp_fast.prune that the package re-exports under the same name

__all__ = ['rel_fro', 'attn_kl', 'logit_kl', 'AttentionRecorder', 'evaluate', 'Quality', 'baseline_selection',
           'dims_for', 'uniform_ratio_for_macs', 'main']


# ------------------------------------------------------------------------------------------------
# metrics

def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖a‖_F (0 when identical)."""
    a, b = a.double(), b.double()
    den = a.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def attn_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean over all rows (last axis = distribution) of KL(p_row || q_row), for probability maps."""
    p, q = p.double(), q.double()
    kl = (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(-1)
    return float(kl.mean())


def _kl_from_logits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(a) || softmax(b)), computed from logits (no eps)."""
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    return (la.exp() * (la - lb)).sum(-1)


def logit_kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of KL(softmax(a) || softmax(b)) for logits (B, classes)."""
    return float(_kl_from_logits(a, b).mean())


def _attn_geometry(attn: nn.Module) -> Tuple[int, int, int, float]:
    if isinstance(attn, vit.PrunedAttention):
        return attn.num_heads, attn.qk_dim, attn.v_dim, float(attn.scale)
    return attn.num_heads, attn.head_dim, attn.head_dim, float(attn.scale)


class AttentionRecorder:
    """Forward hooks on every blocks[i].attn.qkv: keeps the attention LOGITS (B, H, N, N) per block,
    recomputed from the qkv output with the module's q_norm/k_norm and scale."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.maps: Dict[int, List[torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        for i, blk in enumerate(self.model.blocks):
            attn = blk.attn
            H, dqk, dv, scale = _attn_geometry(attn)

            def hook(_m, _inp, out, i=i, attn=attn, H=H, dqk=dqk, dv=dv, scale=scale):
                B, N, _ = out.shape
                q, k, _v = out.split([H * dqk, H * dqk, H * dv], dim=-1)
                q = attn.q_norm(q.reshape(B, N, H, dqk).transpose(1, 2))
                k = attn.k_norm(k.reshape(B, N, H, dqk).transpose(1, 2))
                self.maps.setdefault(i, []).append(((q * scale) @ k.transpose(-2, -1)).detach().float())
            self.handles.append(attn.qkv.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def logits(self, i: int) -> torch.Tensor:
        return torch.cat(self.maps[i])


@torch.no_grad()
def _run(model: nn.Module, x: torch.Tensor, batch: int) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
    model.eval()
    with AttentionRecorder(model) as rec:
        logits = torch.cat([model(x[s:s + batch]) for s in range(0, x.shape[0], batch)])
    return logits, {i: rec.logits(i) for i in rec.maps}


@dataclass
class Quality:
    top1: float
    agreement: float
    logit_kl: float
    attn_err: List[float]           # per block, relative Frobenius error of the softmax maps
    attn_kl: List[float]            # per block, mean row KL
    score_err: List[float] = field(default_factory=list)  # per block, relative error of the PRE-softmax scores
    macs: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def attn_err_mean(self) -> float:
        return sum(self.attn_err) / len(self.attn_err)

    @property
    def attn_kl_mean(self) -> float:
        return sum(self.attn_kl) / len(self.attn_kl)

    @property
    def score_err_mean(self) -> float:
        return sum(self.score_err) / len(self.score_err)


class Reference:
    """The original model's outputs on the held-out set, computed once and compared against."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250):
        self.x, self.y, self.batch = x, y, batch
        self.logits, self.attn = _run(model, x, batch)
        self.top1 = float((self.logits.argmax(-1) == y).float().mean())
        self.macs = count_macs(model)


@torch.no_grad()
def evaluate(ref: Reference, pruned: nn.Module) -> Quality:
    logits, attn = _run(pruned, ref.x, ref.batch)
    err, kl, serr = [], [], []
    for i in sorted(ref.attn):
        a, b = ref.attn[i], attn[i]
        err.append(rel_fro(a.softmax(-1), b.softmax(-1)))
        kl.append(float(_kl_from_logits(a, b).mean()))
        serr.append(rel_fro(a, b))
    pred = logits.argmax(-1)
    return Quality(top1=float((pred == ref.y).float().mean()), agreement=float((pred == ref.logits.argmax(-1)).float().mean()),
                   logit_kl=logit_kl(ref.logits, logits), attn_err=err, attn_kl=kl, score_err=serr,
                   macs=count_macs(pruned))


# ------------------------------------------------------------------------------------------------
# dims and MACs

def dims_for(model: nn.Module, ratios) -> ModelDims:
    """The per-block dims prune() would produce for these ratios."""
    d = vit.model_dims(model)
    return target_dims(d, resolve_ratios(ratios, len(d.blocks)), [])


def macs_of_dims(model: nn.Module, dims: ModelDims) -> int:
    return count_macs(vit.apply_dims(meta_copy(model), dims))


def uniform_ratio_for_macs(model: nn.Module, target: float, tol: float = 1e-3) -> Tuple[float, float]:
    """The uniform ratio r (q/k, v, fc1 and embedding alike) whose MACs fraction is closest to `target`;
    returns (r, achieved MACs fraction). Bisection on r (MACs decrease with r), then the best grid point."""
    full = count_macs(model)
    frac = lambda r: macs_of_dims(model, dims_for(model, r)) / full  # noqa: E731
    lo, hi = 0.0, 0.95
    for _ in range(20):
        mid = (lo + hi) / 2
        if frac(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    cands = [(abs(frac(r) - target), r) for r in (lo, hi)]
    r = min(cands)[1]
    return round(r, 4), frac(r)


# ------------------------------------------------------------------------------------------------
# baseline selections and slicing a custom selection

def _norm(w: torch.Tensor, p: int) -> torch.Tensor:
    return w.detach().flatten(1).float().norm(p=p, dim=1)


def baseline_selection(model: nn.Module, dims: ModelDims, method: str, seed: int = 0) -> Selection:
    """Selection with exactly `dims` by a data-free baseline: 'random' (seeded), 'l1' or 'l2' filter magnitude.

    Magnitude scores per group: q/k pair i of head h: ‖W_q,i‖_p·‖W_k,i‖_p (as prune's qk "magnitude");
    v and fc1 rows: ‖W_i‖_p; residual-stream channels: the rows' ‖·‖_p of every producer of the stream
    (patch embedding, each attn.proj and mlp.fc2), total-sum-scaled and averaged (as prune's embed
    "magnitude"). With p = 2 this is prune(..., *_criterion='magnitude').
    """
    orig = vit.model_dims(model)
    if method == 'random':
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        embed = select_top(rnd(orig.embed), dims.embed)
        blocks = []
        for od, bd in zip(orig.blocks, dims.blocks):
            blocks.append(BlockSelection(select_per_head(rnd(od.heads, od.qk), bd.qk),
                                         select_per_head(rnd(od.heads, od.v), bd.v),
                                         select_top(rnd(od.mlp), bd.mlp)))
        return Selection(embed, blocks)
    if method not in ('l1', 'l2'):
        raise ValueError(f'unknown baseline {method!r}; choose random, l1 or l2')
    p = 1 if method == 'l1' else 2
    producers = [model.patch_embed.proj.weight]
    for blk in model.blocks:
        producers += [blk.attn.proj.weight, blk.mlp.fc2.weight]
    if dims.embed < orig.embed:
        embed = select_top(tss_average([_norm(w, p) for w in producers]), dims.embed)
    else:
        embed = torch.arange(orig.embed)
    blocks = []
    for blk, od, bd in zip(model.blocks, orig.blocks, dims.blocks):
        H, d = od.heads, od.qk
        w = blk.attn.qkv.weight
        n = H * d
        qk = (_norm(w[:n], p) * _norm(w[n:2 * n], p)).view(H, d)
        v = _norm(w[2 * n:], p).view(H, d)
        blocks.append(BlockSelection(select_per_head(qk, bd.qk), select_per_head(v, bd.v),
                                     select_top(_norm(blk.mlp.fc1.weight, p), bd.mlp)))
    return Selection(embed, blocks)


# ------------------------------------------------------------------------------------------------
# the comparison

@dataclass
class Method:
    name: str
    build: Callable  # (model, calib, ratios) -> pruned model
    group: str = ''


def _snp(refit=True, **kw):
    def build(model, calib, ratios, **over):
        return prune(model, calib, ratios=ratios, refit=refit, **{**kw, **over})[0]
    return build


def _baseline(method, refit, seed=0):
    def build(model, calib, ratios, **over):
        sel = baseline_selection(model, dims_for(model, ratios), method, seed)
        return prune(model, calib, selection=sel, refit=refit, **over)[0]
    return build


def methods(quick: bool, seeds: Sequence[int]) -> List[Method]:
    out = []
    for refit in (False, True):
        tag = ' + re-fit' if refit else ''
        for s in seeds:
            out.append(Method(f'random (seed {s}){tag}', _baseline('random', refit, s), 'baseline'))
        out.append(Method(f'L1 magnitude{tag}', _baseline('l1', refit), 'baseline'))
        out.append(Method(f'L2 magnitude{tag}', _baseline('l2', refit), 'baseline'))
        out.append(Method(f'SNP (default){tag}', _snp(refit), 'snp'))
    if quick:
        return out
    for refit in (False, True):
        tag = ' + re-fit' if refit else ''
        for g in (1, 4, 32):
            out.append(Method(f'SNP γ={g}{tag}', _snp(refit, gamma=g), 'gamma'))
        for c in ('magnitude', 'activation'):
            out.append(Method(f'SNP, V/FFN {c}{tag}', _snp(refit, v_criterion=c, mlp_criterion=c), 'vffn'))
        for c in ('magnitude', 'activation'):
            out.append(Method(f'SNP, embed {c}{tag}', _snp(refit, embed_criterion=c), 'embed'))
        out.append(Method(f'Q/K magnitude, V/FFN activation{tag}',
                          _snp(refit, qk_criterion='magnitude', v_criterion='activation', mlp_criterion='activation'),
                          'mixed'))
    # prune(criteria="reconstruction"): chosen for the re-fit (snp_fast/criteria), so only with it
    out.append(Method(f'{RECONSTRUCTION} + re-fit', _snp(True, criteria='reconstruction'), 'reconstruction'))
    return out


RECONSTRUCTION = 'reconstruction (criteria=)'


CALIB_POOL = 256  # training images the calibration sets are drawn from (the sweep over calibration sizes tops out here)


def _digits(n_calib_max: int = CALIB_POOL):
    from snp_fast.demo import digits_data, load_digits_vit
    model = load_digits_vit()
    x_tr, _, x_te, y_te = digits_data()
    perm = torch.randperm(x_tr.shape[0], generator=torch.Generator().manual_seed(1))
    return model, x_tr[perm[:n_calib_max]], x_te, y_te


def _f(x: float, pct=False) -> str:
    return f'{100 * x:.1f}' if pct else (f'{x:.3f}' if x >= 0.01 else f'{x:.1e}')


def run_comparison(model, calib_pool, x_te, y_te, *, quick: bool, n_calib: int = 64, log=print) -> dict:
    torch.manual_seed(0)
    ref = Reference(model, x_te, y_te)
    calib = calib_pool[:n_calib]
    settings = {}
    settings['qk50'] = ('50 % of q/k removed only (v, fc1, embedding kept): isolates the Q/K criterion',
                        dict(qk=0.5, v=0.0, mlp=0.0, embed=0.0))
    settings['qkv50'] = ('50 % of q/k, v, fc1 removed (embedding kept)', dict(qk=0.5, v=0.5, mlp=0.5, embed=0.0))
    targets = (0.5,) if quick else (0.7, 0.5, 0.35, 0.15, 0.08)
    for t in targets:
        r, frac = uniform_ratio_for_macs(model, t)
        settings[f'macs{t}'] = (f'MACs ≈ {frac:.3f} (uniform ratio {r})', r)
    seeds = (0,) if quick else (0, 1, 2)
    ms = methods(quick, seeds)
    results: Dict[str, Dict[str, Quality]] = {}
    for key, (label, ratios) in settings.items():
        results[key] = {}
        for m in ms:
            t0 = time.perf_counter()
            pruned = m.build(model, calib, ratios)
            q = evaluate(ref, pruned)
            q.extra['time'] = time.perf_counter() - t0
            results[key][m.name] = q
            log(f'[{key}] {m.name:45s} top1 {q.top1:.3f} attn {q.attn_err_mean:.3f} kl {q.logit_kl:.3g} '
                f'({q.extra["time"]:.1f}s)')
    sweeps = {}
    if not quick:
        key = 'macs0.5'
        ratios = settings[key][1]
        snp = _snp(True)
        sweeps['damp'] = {d: evaluate(ref, snp(model, calib, ratios, damp=d)) for d in (1e-2, 1e-4, 1e-6)}
        sweeps['refit_mode'] = {m: evaluate(ref, _snp(m)(model, calib, ratios)) for m in ('sequential', 'oneshot')}
        sweeps['refit_tokens'] = {t: evaluate(ref, snp(model, calib, ratios, refit_tokens=t))
                                  for t in (128, 256, 512, None)}
        sweeps['calib'] = {}
        for n in (8, 16, 64, 256):
            sweeps['calib'][n] = {'SNP + re-fit': evaluate(ref, snp(model, calib_pool[:n], ratios)),
                                  'L2 + re-fit': evaluate(ref, _baseline('l2', True)(model, calib_pool[:n], ratios))}
        for name, sw in sweeps.items():
            log(f'[sweep {name}] done')
    return dict(ref=ref, settings=settings, methods=ms, results=results, sweeps=sweeps, n_calib=int(calib.shape[0]),
                seeds=seeds, quick=quick)


# ------------------------------------------------------------------------------------------------
# markdown

def _aggregate_random(res: Dict[str, Quality], seeds) -> Dict[str, Tuple[float, float, float, float]]:
    """name -> (top1 mean, top1 spread, attn err mean, logit kl mean) with random seeds merged."""
    out = {}
    for tag in ('', ' + re-fit'):
        qs = [res[f'random (seed {s}){tag}'] for s in seeds if f'random (seed {s}){tag}' in res]
        if qs:
            t = [q.top1 for q in qs]
            out[f'random ({"mean of " + str(len(qs)) + " seeds" if len(qs) > 1 else "seed " + str(seeds[0])}){tag}'] = (
                statistics.mean(t), (max(t) - min(t)) / 2, statistics.mean(q.attn_err_mean for q in qs),
                statistics.mean(q.logit_kl for q in qs))
    return out


def _rows(res: Dict[str, Quality], seeds):
    rows = {}
    agg = _aggregate_random(res, seeds)
    for name, q in res.items():
        if name.startswith('random (seed'):
            continue
        rows[name] = (q.top1, 0.0, q.attn_err_mean, q.logit_kl)
    return {**agg, **rows}


def to_markdown(c: dict, title: str = 'digits ViT (shipped checkpoint)') -> str:
    ref, settings, results, sweeps, seeds = c['ref'], c['settings'], c['results'], c['sweeps'], c['seeds']
    L = []
    L.append(f'## {title}')
    L.append('')
    L.append(f'Unpruned: top-1 **{100 * ref.top1:.1f} %** on {len(ref.y)} held-out images, {ref.macs / 1e6:.2f} M MACs. '
             f'Calibration: {c["n_calib"]} training images (seeded subset). No fine-tuning anywhere. '
             'Attention error = relative Frobenius error of the softmax attention maps, mean over blocks; '
             'logit KL = KL(original ‖ pruned), mean over held-out images.')
    L.append('')
    # per-setting tables
    for first in ('qk50', 'qkv50'):
        label, _ = settings[first]
        res = results[first]
        L.append(f'### {label}')
        L.append('')
        q0 = next(iter(res.values()))
        L.append(f'MACs {q0.macs / ref.macs:.3f} of unpruned for every method (same per-block dims). '
                 '"attn err" / "attn KL": softmax maps, mean over blocks; "blk0 attn err": block 0 only (its input '
                 'is unchanged when the embedding is kept, so without re-fit it measures the Q/K selection alone); '
                 '"score err": relative error of the pre-softmax scores QKᵀ·scale, mean over blocks.')
        L.append('')
        L.append('| method | top-1 % | agreement % | attn err | attn KL | blk0 attn err | score err | logit KL |')
        L.append('|---|---|---|---|---|---|---|---|')
        for name, q in res.items():
            L.append(f'| {name} | {100 * q.top1:.1f} | {100 * q.agreement:.1f} | {q.attn_err_mean:.3f} | '
                     f'{q.attn_kl_mean:.3f} | {q.attn_err[0]:.3f} | {q.score_err_mean:.3f} | {_f(q.logit_kl)} |')
        L.append('')
    mkeys = [k for k in settings if k.startswith('macs')]
    if mkeys:
        L.append('### Uniform ratios at equal MACs: top-1 % / attention error / logit KL')
        L.append('')
        L.append('| method | ' + ' | '.join(settings[k][0] for k in mkeys) + ' |')
        L.append('|---|' + '---|' * len(mkeys))
        rows = {k: _rows(results[k], seeds) for k in mkeys}
        for name in rows[mkeys[0]]:
            cells = []
            for k in mkeys:
                t, spread, a, kl = rows[k][name]
                cells.append(f'{100 * t:.1f}' + (f' ±{100 * spread:.1f}' if spread else '') + f' / {a:.3f} / {_f(kl)}')
            L.append(f'| {name} | ' + ' | '.join(cells) + ' |')
        L.append('')
    if 'macs0.5' in results:
        res = results['macs0.5']
        pick = [n for n in ('L2 magnitude + re-fit', 'SNP (default) + re-fit', 'L2 magnitude', 'SNP (default)') if n in res]
        L.append(f'### Attention error per block ({settings["macs0.5"][0]})')
        L.append('')
        nb = len(res[pick[0]].attn_err)
        L.append('| method | ' + ' | '.join(f'blk {i}' for i in range(nb)) + ' |')
        L.append('|---|' + '---|' * nb)
        for n in pick:
            L.append(f'| {n} | ' + ' | '.join(f'{e:.3f}' for e in res[n].attn_err) + ' |')
        L.append('')
    if sweeps:
        lab = settings['macs0.5'][0]
        L.append(f'### Sweeps, SNP (default) + re-fit at {lab}, {c["n_calib"]} calibration images unless stated')
        L.append('')
        L.append('| damp | top-1 % | attn err | logit KL |')
        L.append('|---|---|---|---|')
        for d, q in sweeps['damp'].items():
            L.append(f'| {d:g}{" (default)" if d == DEFAULT_DAMP else ""} | {100 * q.top1:.1f} | {q.attn_err_mean:.3f} | {_f(q.logit_kl)} |')
        L.append('')
        if 'refit_mode' in sweeps:  # results saved before the one-shot mode existed have no such table
            L.append('| re-fit | top-1 % | attn err | logit KL |')
            L.append('|---|---|---|---|')
            for m, q in sweeps['refit_mode'].items():
                what = ('sequential (default): each block from the pruned model\'s own hidden states' if m == 'sequential'
                        else 'one-shot: each block from the original hidden states')
                L.append(f'| {what} | {100 * q.top1:.1f} | {q.attn_err_mean:.3f} | {_f(q.logit_kl)} |')
            L.append('')
        L.append(f'| refit_tokens ({c["n_calib"]} images × {ref.attn[0].shape[-1]} tokens) | top-1 % | attn err | logit KL |')
        L.append('|---|---|---|---|')
        for t, q in sweeps['refit_tokens'].items():
            L.append(f'| {t if t is not None else "all (default)"} | {100 * q.top1:.1f} | {q.attn_err_mean:.3f} | {_f(q.logit_kl)} |')
        L.append('')
        L.append('| calibration images | SNP + re-fit top-1 % / attn err / logit KL | L2 + re-fit top-1 % / attn err / logit KL |')
        L.append('|---|---|---|')
        for n, d in sweeps['calib'].items():
            a, b = d['SNP + re-fit'], d['L2 + re-fit']
            L.append(f'| {n} | {100 * a.top1:.1f} / {a.attn_err_mean:.3f} / {_f(a.logit_kl)} | '
                     f'{100 * b.top1:.1f} / {b.attn_err_mean:.3f} / {_f(b.logit_kl)} |')
        L.append('')
    L.append('### Targets')
    L.append('')
    L += [f'- {line}' for line in check_targets(c)]
    L.append('')
    if not c['quick']:
        L.append('### What the numbers support (generated from the tables above)')
        L.append('')
        L += [f'- {line}' for line in supported_defaults(c)]
        L.append('')
    return '\n'.join(L)


def supported_defaults(c: dict) -> List[str]:
    """Best variant per question, by held-out logit KL (ties on top-1 are common on 500 images)."""
    out = []
    res = c['results']
    for key in [k for k in c['settings'] if k.startswith('macs') or k == 'qkv50']:
        r = res[key]
        label = c['settings'][key][0]
        for group, names in (('V/FFN criterion', ['SNP (default)', 'SNP, V/FFN magnitude', 'SNP, V/FFN activation']),
                             ('embed criterion', ['SNP (default)', 'SNP, embed magnitude', 'SNP, embed activation']),
                             ('γ', ['SNP γ=1', 'SNP γ=4', 'SNP (default)', 'SNP γ=32'])):
            for tag in ('', ' + re-fit'):
                cand = [(r[n + tag].logit_kl, n) for n in names if n + tag in r]
                if key == 'qkv50' and group == 'embed criterion':
                    continue
                if cand:
                    kl, best = min(cand)
                    out.append(f'{label}, {group}{tag or " (no re-fit)"}: best {best} (logit KL {_f(kl)}, top-1 '
                               f'{100 * r[best + tag].top1:.1f} %); '
                               + ', '.join(f'{n}: {_f(k)}' for k, n in cand))
    sw = c['sweeps']
    if sw:
        d = min(sw['damp'].items(), key=lambda kv: kv[1].logit_kl)
        out.append(f'damp: lowest logit KL at {d[0]:g} (' + ', '.join(f'{k:g}: {_f(q.logit_kl)} / {100 * q.top1:.1f} %'
                                                                    for k, q in sw['damp'].items()) + ').')
        if 'refit_mode' in sw:
            out.append('re-fit mode: ' + ', '.join(f'{m}: {_f(q.logit_kl)} / {100 * q.top1:.1f} %'
                                                   for m, q in sw['refit_mode'].items()) + ' (logit KL / top-1).')
        out.append('refit_tokens: ' + ', '.join(f'{k if k is not None else "all"}: {_f(q.logit_kl)} / {100 * q.top1:.1f} %'
                                              for k, q in sw['refit_tokens'].items()) + ' (logit KL / top-1).')
        out.append('calibration images (SNP + re-fit): ' + ', '.join(
            f'{n}: {_f(d["SNP + re-fit"].logit_kl)} / {100 * d["SNP + re-fit"].top1:.1f} %' for n, d in sw['calib'].items())
            + ' (logit KL / top-1).')
    return out


def check_targets(c: dict) -> List[str]:
    ref, results = c['ref'], c['results']
    out = []
    res = results['qkv50']
    snp = res['SNP (default) + re-fit']
    base = {n: q for n, q in res.items() if not n.startswith(('SNP', 'Q/K', RECONSTRUCTION))}
    base_nr = {n: q for n, q in base.items() if 're-fit' not in n}
    gap = 100 * (ref.top1 - snp.top1)
    out.append(f'50 % of q/k, v, fc1: SNP + re-fit {100 * snp.top1:.1f} % vs unpruned {100 * ref.top1:.1f} % '
               f'(unpruned − pruned = {gap:+.1f} points): {"MET" if gap <= 1.0 else "MISSED"} (within 1 point).')
    best_nr = max(base_nr.items(), key=lambda kv: kv[1].top1)
    best = max(((n, q) for n, q in base.items() if 're-fit' in n), key=lambda kv: kv[1].top1)
    out.append(f'  SNP + re-fit above every baseline WITHOUT re-fit (best {best_nr[0]}: {100 * best_nr[1].top1:.1f} %): '
               f'{"MET" if snp.top1 > best_nr[1].top1 else "MISSED"} (a weak comparison); above every baseline given '
               f'the same re-fit (the fair one) '
               f'(best {best[0]}: {100 * best[1].top1:.1f} %): '
               f'{"MET" if snp.top1 > best[1].top1 else ("TIED" if snp.top1 == best[1].top1 else "MISSED")}.')
    snp_nr = res['SNP (default)']
    out.append(f'  selection alone (no re-fit): SNP {100 * snp_nr.top1:.1f} % vs L2 {100 * res["L2 magnitude"].top1:.1f} %, '
               f'random {100 * res["random (seed 0)"].top1:.1f} % (seed 0).')
    if 'macs0.5' in results:
        r = results['macs0.5']
        for tag in ('', ' + re-fit'):
            a, b = r[f'SNP (default){tag}'], r[f'L2 magnitude{tag}']
            out.append(f'50 % of MACs{tag or " (no re-fit)"}: SNP {100 * a.top1:.1f} % vs L2 {100 * b.top1:.1f} % '
                       f'(logit KL {_f(a.logit_kl)} vs {_f(b.logit_kl)}): '
                       f'{"MET" if a.top1 > b.top1 else ("TIED" if a.top1 == b.top1 else "MISSED")} (ahead of L2).')
    rec = f'{RECONSTRUCTION} + re-fit'
    for key in [k for k in ('macs0.5', 'macs0.15', 'macs0.08') if k in results and rec in results[k]]:
        a, b = results[key]['SNP (default) + re-fit'], results[key][rec]
        d, ratio = 100 * (b.top1 - a.top1), b.logit_kl / max(a.logit_kl, 1e-30)
        if key == 'macs0.5':
            ok = 'MET' if b.top1 >= a.top1 and b.logit_kl <= a.logit_kl else 'MISSED'
            goal = 'never worse than SNP + re-fit'
        else:
            ok = 'MET' if d >= 2 or ratio <= 0.6 else 'MISSED'
            goal = '≥ 2 points above SNP + re-fit or logit KL ≤ 0.6×'
        out.append(f'{c["settings"][key][0]}: reconstruction + re-fit {100 * b.top1:.1f} % / logit KL {_f(b.logit_kl)} '
                   f'vs SNP + re-fit {100 * a.top1:.1f} % / {_f(a.logit_kl)} ({d:+.1f} points, KL {ratio:.2f}×): '
                   f'{ok} ({goal}).')
    for key, (label, _) in c['settings'].items():
        r = results[key]
        for tag in ('', ' + re-fit'):
            cand = {n: q for n, q in r.items() if (tag == '') == ('re-fit' not in n)}
            best = min(cand.items(), key=lambda kv: kv[1].attn_err_mean)
            snp = cand[f'SNP (default){tag}']
            ok = best[0] == f'SNP (default){tag}'
            out.append(f'{label}{tag or " (no re-fit)"}: lowest attention error {best[0]} ({best[1].attn_err_mean:.3f}); '
                       f'SNP (default) {snp.attn_err_mean:.3f}: {"MET" if ok else "MISSED"}.')
    return out


# ------------------------------------------------------------------------------------------------
# head pruning: which head criterion (prune(..., head_criterion=))

HEAD_SETTINGS = {
    'heads50': ('50 % of the heads of every block removed, nothing else: isolates the head criterion',
                {'heads': 0.5}),
    'heads25_snp50': ('25 % of the heads removed, then 50 % of q/k, v and fc1 inside the kept heads',
                      {'heads': 0.25, 'qk': 0.5, 'v': 0.5, 'mlp': 0.5}),
}


def _random_heads(model: nn.Module, ratios: dict, seed: int) -> Selection:
    """Random kept heads (all their dims kept): the chance baseline for the heads-only setting."""
    g = torch.Generator().manual_seed(seed)
    od, dims = vit.model_dims(model), dims_for(model, ratios)
    blocks = []
    for o, b in zip(od.blocks, dims.blocks):
        heads = torch.randperm(o.heads, generator=g)[:b.heads].sort().values
        blocks.append(BlockSelection(torch.arange(b.qk).expand(b.heads, b.qk).clone(),
                                     torch.arange(b.v).expand(b.heads, b.v).clone(), torch.arange(b.mlp), heads))
    return Selection(torch.arange(od.embed), blocks)


@torch.no_grad()
def _head_quality(ref: 'Reference', pruned: nn.Module, sel: Selection) -> Quality:
    """Quality of a head-pruned model; the attention error is over the KEPT heads (removed heads have no map)."""
    logits, attn = _run(pruned, ref.x, ref.batch)
    err, kl = [], []
    for i, b in enumerate(sel.blocks):
        a = ref.attn[i][:, b.head_index()]
        err.append(rel_fro(a.softmax(-1), attn[i].softmax(-1)))
        kl.append(float(_kl_from_logits(a, attn[i]).mean()))
    pred = logits.argmax(-1)
    return Quality(top1=float((pred == ref.y).float().mean()), agreement=float((pred == ref.logits.argmax(-1)).float().mean()),
                   logit_kl=logit_kl(ref.logits, logits), attn_err=err, attn_kl=kl, macs=count_macs(pruned))


def compare_head_criteria(model: nn.Module, calib: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, *,
                          seeds: Sequence[int] = (0, 1, 2), log=print) -> dict:
    """Every head criterion (and random heads, heads-only setting) at equal dims, with and without re-fit."""
    from snp_fast.scores import HEAD_CRITERIA
    ref = Reference(model, x_te, y_te)
    out = {'settings': {k: v[0] for k, v in HEAD_SETTINGS.items()}, 'results': {}, 'kept': {},
           'seeds': list(seeds), 'n_calib': int(calib.shape[0]), 'n_test': int(y_te.shape[0])}
    for key, (_, ratios) in HEAD_SETTINGS.items():
        res = out['results'][key] = {}
        for refit in (False, True):
            tag = ' + re-fit' if refit else ''
            for crit in HEAD_CRITERIA:
                pruned, _ = prune(model, calib, ratios=ratios, head_criterion=crit, refit=refit)
                sel = Selection.from_dict(pruned.snp_recipe['selection'])
                res[f'{crit}{tag}'] = _head_quality(ref, pruned, sel)
                out['kept'][(key, crit)] = [b.head_index().tolist() for b in sel.blocks]
            if set(ratios) == {'heads'}:
                for s in seeds:
                    sel = _random_heads(model, ratios, s)
                    res[f'random (seed {s}){tag}'] = _head_quality(
                        ref, prune(model, calib, selection=sel, refit=refit)[0], sel)
            log(f'[heads {key}{tag}] ' + ', '.join(f'{n} {q.top1:.3f}/{q.attn_err_mean:.3f}' for n, q in res.items()))
    return out


def heads_markdown(c: dict) -> str:
    L = ['## Head pruning: head criteria at equal dims (digits ViT, 4 heads per block)', '',
         'Written by `python -m research.quality` (alone: `--heads`). "output" = each head\'s share of '
         'attn.proj\'s output (‖ctx_h W_hᵀ‖² over the calibration tokens); "snp" = the head\'s attention-score '
         'energy (top-γ σ² of Q_h K_hᵀ); random = kept heads drawn at random (heads-only setting, mean of '
         f'{len(c["seeds"])} seeds). Same dims, params and MACs for every row of a table. "attn err" is over the '
         f'KEPT heads only. {c["n_calib"]} calibration images, {c["n_test"]} held-out.', '']
    for key, label in c['settings'].items():
        res = c['results'][key]
        L += [f'### {label}', '', '| head criterion | top-1 % | agreement % | attn err (kept heads) | logit KL |',
              '|---|---|---|---|---|']
        names = [n for n in res if not n.startswith('random')]
        rnd = {}
        for n, q in res.items():
            if n.startswith('random'):
                rnd.setdefault(' + re-fit' if 're-fit' in n else '', []).append(q)
        for tag, qs in rnd.items():
            names.append(f'random (mean of {len(qs)}){tag}')
            res = {**res, names[-1]: Quality(statistics.mean(q.top1 for q in qs), statistics.mean(q.agreement for q in qs),
                                             statistics.mean(q.logit_kl for q in qs),
                                             [statistics.mean(q.attn_err_mean for q in qs)], [0.0])}
        for n in sorted(names, key=lambda n: ('re-fit' in n, n)):
            q = res[n]
            L.append(f'| {n} | {100 * q.top1:.1f} | {100 * q.agreement:.1f} | {q.attn_err_mean:.3f} | {_f(q.logit_kl)} |')
        same = sum(a == b for a, b in zip(c['kept'][(key, 'output')], c['kept'][(key, 'snp')]))
        L += ['', f'Kept heads identical for both criteria in {same} of {len(c["kept"][(key, "output")])} blocks.', '']
    return '\n'.join(L + heads_verdict(c))


def heads_verdict(c: dict) -> List[str]:
    """'snp' against 'output' over every (setting, re-fit) pair of rows: top-1 and logit KL."""
    pairs = [(res['snp' + t], res['output' + t]) for res in c['results'].values() for t in ('', ' + re-fit')
             if 'snp' + t in res and 'output' + t in res]
    gaps = ', '.join(f'{100 * (s.top1 - o.top1):+.1f}' for s, o in pairs)
    n_img = c['n_test']
    return [f'"snp" against "output", row pair by row pair (the tables\' order, without / with re-fit): top-1 '
            f'{gaps} points (1 image = {100 / n_img:.1f} points); higher top-1 in '
            f'{sum(s.top1 > o.top1 for s, o in pairs)} of {len(pairs)} pairs, lower logit KL in '
            f'{sum(s.logit_kl < o.logit_kl for s, o in pairs)} of {len(pairs)}. One small fixture: a DeiT-scale check '
            'would need ImageNet data, which is not available here.', '']


# ------------------------------------------------------------------------------------------------
# short recovery by knowledge distillation (snp_fast.finetune) after pruning

KD_METHODS = ('random (seed 0)', 'L1 magnitude', 'L2 magnitude', 'SNP (default)')
KD_DEFAULT = dict(epochs=3, batch_size=64, lr=2e-4)   # ~60 AdamW steps on ~1.2k images: "short"


def _faces(n_calib_max: int = CALIB_POOL):
    """The faces fixture: model, a calibration pool and the KD training set (the 150 training images in all
    four 24×24 crops, plain and mirrored: 1200 images), held-out top-left crops."""
    from snp_fast.demo import faces_crop, faces_data, load_faces_vit
    x_tr, y_tr, x_te, y_te = faces_data()
    views = [faces_crop(x_tr, t, l) for t in (0, 1) for l in (0, 1)]
    views += [v.flip(-1) for v in views]
    x_aug, y_aug = torch.cat(views), y_tr.repeat(len(views))
    perm = torch.randperm(x_aug.shape[0], generator=torch.Generator().manual_seed(1))
    return load_faces_vit(), x_aug[perm[:n_calib_max]], faces_crop(x_te), y_te, (x_aug, y_aug)


def run_kd(model: nn.Module, calib: torch.Tensor, train: Tuple[torch.Tensor, torch.Tensor], c: dict, *,
           quick: bool, kd: Optional[dict] = None, log=print) -> dict:
    """Top-1 etc. after a short KD recovery (snp_fast.finetune, teacher = the unpruned model) of the KD_METHODS
    models at every equal-MACs setting of comparison `c`; the pruned models are rebuilt exactly as in
    run_comparison (same seeds, same calibration images)."""
    import copy
    from snp_fast.finetune import FinetuneConfig, finetune
    kd = {**KD_DEFAULT, **(kd or {})}
    cfg = FinetuneConfig(**kd)
    names = [n + t for n in KD_METHODS for t in ('', ' + re-fit')]
    if quick:
        names = ['L2 magnitude + re-fit', 'SNP (default) + re-fit']
    ms = [m for m in methods(True, (0,)) if m.name in names]
    out = {'config': kd, 'n_train': int(train[0].shape[0]), 'results': {}}
    for key in [k for k in c['settings'] if k.startswith('macs')]:
        ratios = c['settings'][key][1]
        res = out['results'][key] = {}
        for m in ms:
            t0 = time.perf_counter()
            student = copy.deepcopy(m.build(model, calib, ratios))
            # on the CPU, where the held-out images and later methods' teacher are (finetune moves both models)
            student = finetune(student, model, train[0], train[1], cfg, device='cpu', log=None).model
            q = res[m.name] = evaluate(c['ref'], student)
            q.extra['time'] = time.perf_counter() - t0
            log(f'[{key} KD] {m.name:30s} top1 {c["results"][key][m.name].top1:.3f} -> {q.top1:.3f} '
                f'(logit KL {q.logit_kl:.3g}, {q.extra["time"]:.1f}s)')
    return out


def kd_markdown(c: dict) -> str:
    kd, ref = c.get('kd'), c['ref']
    if not kd:
        return ''
    keys = list(kd['results'])
    cfg = kd['config']
    L = ['### After a short KD recovery (snp_fast.finetune)', '',
         f'Each pruned model above, distilled from the unpruned model: {cfg["epochs"]} epochs × {kd["n_train"]} '
         f'training images, global batch {cfg["batch_size"]}, AdamW peak lr {cfg["lr"]:g} (5 % warm-up, cosine), '
         'loss 0.7·T²·KL + 0.3·CE at T = 2 (FinetuneConfig defaults otherwise). Cell: top-1 % no fine-tuning → '
         f'after KD / logit KL after KD. Unpruned: {100 * ref.top1:.1f} %.', '',
         '| method | ' + ' | '.join(c['settings'][k][0] for k in keys) + ' |', '|---|' + '---|' * len(keys)]
    for name in kd['results'][keys[0]]:
        cells = [f'{100 * c["results"][k][name].top1:.1f} → **{100 * kd["results"][k][name].top1:.1f}** / '
                 f'{_f(kd["results"][k][name].logit_kl)}' for k in keys]
        L.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    L.append('')
    for tag, pick in (('without re-fit', lambda n: 're-fit' not in n), ('with re-fit', lambda n: 're-fit' in n)):
        pairs = [(c['results'][k][n].logit_kl, kd['results'][k][n].logit_kl) for k in keys
                 for n in kd['results'][k] if pick(n)]
        if pairs:
            L.append(f'- Models {tag}: the KD recovery lowered the logit KL in {sum(a < b for b, a in pairs)} of '
                     f'{len(pairs)} (method, MACs) cells' + ('' if tag == 'without re-fit' else
                                                            ' (likely: 30 % of the loss is CE on the labels and '
                                                            'the re-fit already matches the teacher closely; a '
                                                            'pure-KD or lower-lr recovery was not measured)') + '.')
    L.append('')
    k35 = next((k for k in keys if k.startswith('macs0.35')), None)
    if k35 is not None:
        r = kd['results'][k35]
        snp = r['SNP (default) + re-fit']
        gap = 100 * (ref.top1 - snp.top1)
        best = max(r.items(), key=lambda kv: (kv[1].top1, -kv[1].logit_kl))
        L.append(f'- Target, {c["settings"][k35][0]}: after short KD recovery SNP (default) + re-fit '
                 f'{100 * snp.top1:.1f} % vs unpruned {100 * ref.top1:.1f} % (unpruned − pruned = {gap:+.1f} points): '
                 f'{"MET" if gap <= 1.0 else "MISSED"} (within 1 point). Best after KD: {best[0]} '
                 f'{100 * best[1].top1:.1f} %; within 1 point: '
                 + ', '.join(n for n, q in r.items() if 100 * (ref.top1 - q.top1) <= 1.0) + '.')
        L.append('')
    return '\n' + '\n'.join(L)


HEADER = """# QUALITY — SNP vs baselines at equal MACs, without fine-tuning and after a short KD recovery

Written by `python -m research.quality` (research/quality.py); every number below is regenerated by that
command. Baselines get exactly the per-block dims of the SNP model, hence the same params and MACs
(tests/test_quality.py checks this). Random and L1 selections are sliced and re-fit through prune()'s
own mechanics (`snp_fast.prune(..., selection=...)`); L2 magnitude here equals
`prune(..., qk_criterion='magnitude', v_criterion='magnitude', mlp_criterion='magnitude',
embed_criterion='magnitude')`. "reconstruction (criteria=) + re-fit" = `prune(..., criteria='reconstruction')`
(snp_fast/criteria: selection by the error left after the re-fit; its variants and 3 calibration draws:
research/reconstruction_table.md). "+ re-fit" = the sequential least-squares re-fit (damp 1e-4, all
calibration tokens unless swept). Metrics: see the module docstring of research/quality.py.
"After a short KD recovery" = each pruned model distilled from the unpruned one with snp_fast.finetune
(settings in that section; `--kd-epochs 0` leaves it out).
Caveats: two small fixtures. The shipped digits ViT: 500 held-out images, so 1 image = 0.2 points of
top-1; differences under ~1 point are noise, the logit KL is the finer signal; with 17 tokens QKᵀ has
rank ≤ 17, so any γ ≥ 17 (incl. γ=32) gives the same Q/K selection; the default γ is the kept q/k width
per head (16 at 50 %). The faces ViT (second section): only 50 held-out images (1 image = 2 points), so
its top-1 columns are coarse; read its logit KL and attention error.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='MACs 0.5 and 50 %% q/k/v/fc1 only, core methods, no sweeps')
    ap.add_argument('--out', default=None, help='markdown output (default: QUALITY.md, or stdout with --quick)')
    ap.add_argument('--calib', type=int, default=64, help='calibration images for the method tables')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--cache', default=None, help='save the raw results here (torch.save), or re-render from it '
                    'if it exists')
    ap.add_argument('--kd-epochs', type=int, default=KD_DEFAULT['epochs'], help='epochs of the short KD recovery '
                    'column (0: no KD column); --quick: 1 epoch on 256 images')
    ap.add_argument('--no-faces', action='store_true', help='skip the second fixture (the faces ViT)')
    ap.add_argument('--heads', action='store_true', help='only the head-criterion comparison (markdown to --out or '
                    'stdout)')
    args = ap.parse_args(argv)
    if not 1 <= args.calib <= CALIB_POOL:
        ap.error(f'--calib {args.calib}: the calibration pool holds {CALIB_POOL} training images (seeded subset); '
                 f'give 1 to {CALIB_POOL}')
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args) -> int:
    t0 = time.perf_counter()
    if args.heads:
        model, pool, x_te, y_te = _digits()
        md = heads_markdown(compare_head_criteria(model, pool[:args.calib], x_te, y_te)) + \
            f'\n_Generated in {time.perf_counter() - t0:.0f} s._\n'
        if args.out is None:
            print(md)
        else:
            with open(args.out, 'w') as f:
                f.write(md)
        return 0
    log = (lambda *a, **k: None) if args.quick and args.out is None else print
    import os
    if args.cache and os.path.exists(args.cache):
        c = torch.load(args.cache, weights_only=False)
        t0 -= c.get('elapsed', 0.0)
        if c.get('quick', args.quick) != args.quick:
            print(f'note: --cache {args.cache} holds a {"--quick" if c["quick"] else "full"} run; rendering it as it is')
    else:
        model, pool, x_te, y_te = _digits()
        c = run_comparison(model, pool, x_te, y_te, quick=args.quick, n_calib=args.calib, log=log)
        if args.kd_epochs > 0:
            from snp_fast.demo import digits_data
            x_tr, y_tr = digits_data()[:2]
            n = 256 if args.quick else len(y_tr)
            c['kd'] = run_kd(model, pool[:args.calib], (x_tr[:n], y_tr[:n]), c, quick=args.quick,
                             kd=dict(epochs=1 if args.quick else args.kd_epochs), log=log)
        if not args.quick and not args.no_faces:
            f_model, f_pool, f_x_te, f_y_te, f_train = _faces()
            c['faces'] = run_comparison(f_model, f_pool, f_x_te, f_y_te, quick=False, n_calib=args.calib, log=log)
            if args.kd_epochs > 0:
                c['faces']['kd'] = run_kd(f_model, f_pool[:args.calib], f_train, c['faces'], quick=False,
                                          kd=dict(epochs=args.kd_epochs), log=log)
            c['faces']['methods'] = [m.name for m in c['faces']['methods']]
            c['faces']['ref'].attn = {0: c['faces']['ref'].attn[0][:1]}
        if not args.quick:  # the digits model again (prune and KD leave the teacher as it was)
            c['heads'] = compare_head_criteria(model, pool[:args.calib], x_te, y_te, log=log)
        c['methods'] = [m.name for m in c['methods']]
        c['quick'] = args.quick
        c['elapsed'] = time.perf_counter() - t0
        c['ref'].attn = {0: c['ref'].attn[0][:1]}  # keep the cache small (only the token count is rendered)
        if args.cache:
            torch.save(c, args.cache)
    md = HEADER + '\n' + to_markdown(c) + kd_markdown(c)
    if 'faces' in c:
        md += '\n' + to_markdown(c['faces'], title='faces ViT (second shipped fixture: scikit-image lfw_subset, '
                                                 'faces vs non-faces)') + kd_markdown(c['faces'])
    if 'heads' in c:
        md += '\n' + heads_markdown(c['heads'])
    md += f'\n_Generated in {time.perf_counter() - t0:.0f} s ' \
        f'({"--quick" if c.get("quick", args.quick) else "full"} run, torch {torch.__version__}, ' \
        f'{args.threads} threads)._\n'
    out = args.out if args.out is not None else (None if args.quick else 'QUALITY.md')
    if out is None:
        print(md)
    else:
        with open(out, 'w') as f:
            f.write(md)
        print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
