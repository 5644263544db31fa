"""Core SNP pipeline: slicing == masking, scores, presets' MACs, re-fit, save/load, bad input."""
import copy
import importlib
import json
import os
import re
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import snp_fast
import snp_fast.refit
from snp_fast.macs import meta_copy
from snp_fast.families import vit
from snp_fast.ops import reference
from snp_fast.families.vit import resolve_ratios, target_dims
from snp_fast.refit import LinearFit

pytestmark = pytest.mark.filterwarnings('ignore:snp_fast. .*reference')

# Small variants of real timm architectures (2 blocks, 64×64 input) keep the suite fast while covering
# every structural feature: distillation token + head, LayerScale, no_embed_class, register tokens,
# class_token=False with average pooling.
TINY = {
    'deit_tiny_patch16_224': {},
    'deit_small_distilled_patch16_224': {},
    'deit3_small_patch16_224': {},
    'vit_medium_patch16_reg4_gap_256': {},
    'vit_base_patch16_224': {},
}


def tiny(name, depth=2, img_size=64, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, depth=depth, img_size=img_size, num_classes=10, **kw)
    # timm's init leaves biases at zero and LayerScale near 1e-5: randomise so nothing is trivially equal
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith('bias') or 'gamma' in n or n.endswith('token'):
                p.normal_(0, 0.2)
    return m.eval()


def images(n=4, size=64, chans=3):
    return torch.randn(n, chans, size, size)


def random_ratios(depth, seed, embed=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda: float(torch.rand((), generator=g) * 0.9)  # noqa: E731
    return {'blocks': [dict(qk=r(), v=r(), mlp=r()) for _ in range(depth)], 'embed': embed}


def masked_twin(model, selection):
    """The original model with every removed q/k, v and fc1 filter zeroed (docs/METHOD.md's test invariant)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for blk, sel in zip(twin.blocks, selection['blocks']):
            H, d = blk.attn.num_heads, blk.attn.head_dim
            keep_q = torch.zeros(H * d, dtype=torch.bool)
            keep_q[vit.head_rows(torch.tensor(sel['qk']), d)] = True
            keep_v = torch.zeros(H * d, dtype=torch.bool)
            keep_v[vit.head_rows(torch.tensor(sel['v']), d)] = True
            keep_rows = torch.cat([keep_q, keep_q, keep_v])
            blk.attn.qkv.weight[~keep_rows] = 0
            if blk.attn.qkv.bias is not None:
                blk.attn.qkv.bias[~keep_rows] = 0
            keep_m = torch.zeros(blk.mlp.fc1.out_features, dtype=torch.bool)
            keep_m[torch.tensor(sel['mlp'])] = True
            blk.mlp.fc1.weight[~keep_m] = 0
            blk.mlp.fc1.bias[~keep_m] = 0
    return twin


# ------------------------------------------------------------------------------------------------
# slicing == masking

@pytest.mark.parametrize('name', list(TINY))
@pytest.mark.parametrize('seed', [0, 1])
def test_slice_equals_mask(name, seed):
    model = tiny(name, **TINY[name])
    x = images(4, size=model.patch_embed.img_size[0])
    pruned, report = snp_fast.prune(model, x, ratios=random_ratios(len(model.blocks), seed), refit=False)
    assert report.params_after < report.params_before
    assert all(isinstance(b.attn, snp_fast.PrunedAttention) for b in pruned.blocks)
    twin = masked_twin(model, pruned.snp_recipe['selection'])
    with torch.no_grad():
        assert (pruned(x) - twin(x)).abs().max().item() <= 1e-5
        # the attention scale is the ORIGINAL one even though q/k widths changed
        assert pruned.blocks[0].attn.scale == model.blocks[0].attn.scale


def test_pruned_attention_honours_attn_mask():
    model = tiny('deit_tiny_patch16_224')
    x = images(2)
    pruned, _ = snp_fast.prune(model, x, ratios={'qk': 0.5, 'v': 0.25, 'mlp': 0.5}, refit=False)
    twin = masked_twin(model, pruned.snp_recipe['selection'])
    n = 1 + model.patch_embed.num_patches
    mask = torch.rand(n, n) > 0.3
    mask |= torch.eye(n, dtype=torch.bool)
    with torch.no_grad():
        a, b = pruned(x, attn_mask=mask), twin(x, attn_mask=mask)
        assert (a - b).abs().max().item() <= 1e-5
        assert (a - pruned(x)).abs().max().item() > 1e-4  # the mask did something
        c = pruned.forward_features(x, is_causal=True)
        assert (c - twin.forward_features(x, is_causal=True)).abs().max().item() <= 1e-5
        assert (c - pruned.forward_features(x)).abs().max().item() > 1e-4


def test_magnitude_criteria_need_no_data():
    model = tiny('deit_tiny_patch16_224')
    pruned, _ = snp_fast.prune(model, None, ratios=0.5, refit=False, qk_criterion='magnitude',
                               v_criterion='magnitude', mlp_criterion='magnitude', embed_criterion='magnitude')
    assert pruned.embed_dim == 96
    with torch.no_grad():
        assert pruned(images(1)).shape == (1, 10)


def test_magnitude_embed_criterion_sees_layerscale():
    """The residual channels' row norms are those of what reaches the stream: proj / fc2 rows times the
    branch's LayerScale. Channels whose rows are small but whose LayerScale is large are kept (they were
    ranked by the raw rows)."""
    model = tiny('deit3_small_patch16_224')
    with torch.no_grad():
        for blk in model.blocks:
            for ls, lin in ((blk.ls1, blk.attn.proj), (blk.ls2, blk.mlp.fc2)):
                ls.gamma.fill_(0.1)
                ls.gamma[:8] = 100.0
                lin.weight[:8] *= 0.01  # small raw rows, large once scaled
    pruned, _ = snp_fast.prune(model, None, ratios={'embed': 0.5}, refit=False, qk_criterion='magnitude',
                               embed_criterion='magnitude')
    assert set(range(8)) <= set(pruned.snp_recipe['selection']['embed'])


# ------------------------------------------------------------------------------------------------
# Q/K scores

def _brute_force_scores(q, k, gamma):
    """The SNP formula with the flattened N×N matrices, written out loop by loop."""
    B, H, N, d = q.shape
    out = torch.zeros(H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h].T
            u, sig, vh = torch.linalg.svd(s)
            for j in range(min(gamma, N)):
                if sig[j] <= 1e-9 * sig[0]:
                    continue
                a = sig[j] * torch.outer(u[:, j], vh[j])
                for i in range(d):
                    p = torch.outer(q[b, h, :, i], k[b, h, :, i])
                    den = a.norm() * p.norm()
                    if den > 0:
                        out[h, i] += ((a * p).sum() / den).abs()
    return out


@pytest.mark.parametrize('B,H,N,d,gamma', [(2, 3, 12, 6, 3), (1, 2, 5, 8, 8), (2, 1, 9, 4, 4)])
def test_qk_reference_equals_brute_force(B, H, N, d, gamma):
    q = torch.randn(B, H, N, d, dtype=torch.float64)
    k = torch.randn(B, H, N, d, dtype=torch.float64)
    q[:, 0, :, 1] = 0  # a dead query filter (in every image)
    expected = _brute_force_scores(q, k, gamma)
    lit = reference.qk_scores_literal(q, k, gamma, compute_dtype=torch.float64)
    torch.testing.assert_close(lit.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.qk_scores_dxd(q, k, gamma).double(), expected, rtol=1e-4, atol=1e-4)
    assert lit[0, 1] == 0  # a dead filter preserves nothing


@pytest.mark.parametrize('N,d', [(3, 16), (1, 8), (20, 16)])
def test_qk_scores_rank_deficient_are_finite(N, d):
    q, k = torch.randn(2, 2, N, d), torch.randn(2, 2, N, d)
    k[:, :, :, :3] = 0                        # zero key filters
    q[:, 1] = q[:, 1, :, :1] * torch.randn(d)  # head 1: rank-one queries
    lit = reference.qk_scores_literal(q, k, d)
    fast = reference.qk_scores_dxd(q, k, d)
    assert torch.isfinite(lit).all() and torch.isfinite(fast).all()
    torch.testing.assert_close(fast, lit, rtol=1e-3, atol=1e-3)
    assert (lit[:, :3] == 0).all()


# ------------------------------------------------------------------------------------------------
# presets and MACs

@pytest.mark.parametrize('preset,gmacs', [('deit_tiny_patch16_224', 0.638), ('deit_small_patch16_224', 2.037),
                                          ('deit_small_patch16_224_1p3G', 1.265), ('deit_base_patch16_224', 6.322)])
def test_presets_reproduce_published_macs(preset, gmacs):
    name = snp_fast.load_preset(preset)['model']
    model = timm.create_model(name, pretrained=False, device='meta')
    dims = target_dims(vit.model_dims(model), resolve_ratios(preset, len(model.blocks)), [])
    pruned = vit.apply_dims(meta_copy(model), dims)
    assert round(snp_fast.count_macs(pruned) / 1e9, 3) == gmacs


def test_macs_counter_matches_formula():
    model = timm.create_model('deit_small_patch16_224', pretrained=False, device='meta')
    N, D, hid = 197, 384, 1536
    per_block = N * D * 3 * D + 2 * N * N * D + N * D * D + 2 * N * D * hid
    assert snp_fast.count_macs(model) == 12 * per_block + 196 * 768 * D + D * 1000


def test_presets_shipped_in_package():
    assert set(snp_fast.list_presets()) >= {'deit_tiny_patch16_224', 'deit_small_patch16_224',
                                            'deit_small_patch16_224_1p3G', 'deit_base_patch16_224'}


def test_presets_are_checked_against_the_model():
    """A preset for other widths warns (its MACs do not apply) and is noted in the report; one for another
    depth or another family is refused, naming the preset's model; the preset's own model is silent."""
    kw = dict(refit=False, qk_criterion='magnitude')
    with pytest.warns(UserWarning, match="chosen for deit_tiny_patch16_224 .*embedding 192.*differ .embedding 768"):
        _, report = snp_fast.prune(timm.create_model('deit_base_patch16_224').eval(), preset='deit_tiny_patch16_224', **kw)
    assert any('MACs the preset quotes do not' in n for n in report.notes)
    with pytest.raises(ValueError, match=r'is for deit_tiny_patch16_224 \(12 blocks\); this model has 4'):
        snp_fast.prune(timm.create_model('deit_tiny_patch16_224', depth=4).eval(), preset='deit_tiny_patch16_224', **kw)
    with pytest.raises(ValueError, match='is for efficientformer_l1, not a ViT'):
        snp_fast.prune(timm.create_model('deit_tiny_patch16_224').eval(), preset='efficientformer_l1_0p6G', **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        snp_fast.prune(timm.create_model('deit_tiny_patch16_224').eval(), preset='deit_tiny_patch16_224', **kw)


@pytest.mark.parametrize('name', list(TINY))
def test_pruned_models_run_forward_and_backward(name):
    model = tiny(name, **TINY[name])
    x = images(2, size=model.patch_embed.img_size[0])
    pruned, _ = snp_fast.prune(model, x, ratios={'qk': 0.5, 'v': 0.5, 'mlp': 0.5, 'embed': 0.25})
    pruned.train()
    out = pruned(x)
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    for n, p in pruned.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert not any(p.is_meta for p in pruned.parameters())


# ------------------------------------------------------------------------------------------------
# re-fit

def test_refit_with_nothing_removed_keeps_weights():
    model = tiny('deit_tiny_patch16_224')
    x = images(8)
    pruned, report = snp_fast.prune(model, x, ratios=0.0, refit=True)
    for (n, a), (_, b) in zip(model.named_parameters(), pruned.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=n)
    assert len(report.refit) == 4 * 2 + 1


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_refit_fits_half_precision_layers_off_by_more_than_rounding(dtype):
    """A bfloat16 layer whose outputs are ~3 % off is fitted (the "already matches" cut was 256 ulp² and
    skipped it); the fit brings it to the dtype's rounding."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 32, generator=g)
    target = nn.Linear(32, 16)
    with torch.no_grad():
        y = target(x)
        layer = nn.Linear(32, 16).to(dtype)
        layer.weight.copy_(target.weight + 0.03 * torch.randn(16, 32, generator=g) * target.weight.abs().mean())
        layer.bias.copy_(target.bias)
    fit = LinearFit(layer)
    fit.add(x.to(dtype), y)
    st = fit.solve()
    assert st.err_sliced > 1e-4 and st.err_refit < st.err_sliced / 50
    with torch.no_grad():
        err = (layer(x.to(dtype)).float() - y).pow(2).sum() / y.pow(2).sum()
    assert err < st.err_sliced / 10


def test_refit_reproduces_output_when_removed_filter_is_collinear():
    """Removing an input exactly collinear with a kept one loses nothing that the re-fit cannot restore.
    The ridge (damp) trades exactness for robustness with few calibration tokens: with damp -> 0 the
    output is reproduced exactly; the default (1e-4, chosen on the digits measurements) still removes
    all but ~1e-4 of the error."""
    torch.manual_seed(0)
    x = torch.randn(500, 12, dtype=torch.float64)
    x[:, 5] = 2.5 * x[:, 2]                         # input feature 5 is exactly collinear with 2
    full = nn.Linear(12, 7).double()
    y = full(x).detach()
    keep = torch.tensor([i for i in range(12) if i != 5])
    # (damp, bound on the max abs output error as a fraction of the sliced layer's)
    for damp, tol in ((1e-8, None), (snp_fast.refit.DEFAULT_DAMP, 1e-3)):
        sliced = nn.Linear(11, 7).double()
        with torch.no_grad():
            sliced.weight.copy_(full.weight[:, keep])
            sliced.bias.copy_(full.bias)
        err_before = (sliced(x[:, keep]) - y).abs().max().item()
        fit = LinearFit(sliced)
        fit.add(x[:, keep], y)
        stats = fit.solve(damp)
        assert stats.err_sliced > 1e-3 and stats.err_refit < 1e-6
        err_after = (sliced(x[:, keep]) - y).abs().max().item()
        assert err_after <= (1e-5 if tol is None else tol * err_before), (damp, err_after, err_before)


def test_phase_timer_nests_without_double_counting(monkeypatch):
    """An inner phase pauses the outer one: each second is counted once, on the innermost open phase."""
    P = importlib.import_module('snp_fast.report')
    clock = iter([0.0, 2.0, 7.0, 9.0, 10.0, 13.0])  # enter sel, enter red, leave red, leave sel, enter/leave qk
    monkeypatch.setattr(P.time, 'perf_counter', lambda: next(clock))
    timer = P.Timer()
    with timer('selection'):
        with timer('redundancy'):
            pass
    with timer('qk_scoring'):
        pass
    assert set(P.PHASES) <= set(timer.times)
    assert (timer.times['selection'], timer.times['redundancy'], timer.times['qk_scoring']) == (4.0, 5.0, 3.0)


def test_prune_reports_redundancy_phase():
    model = tiny('deit_small_distilled_patch16_224')
    _, report = snp_fast.prune(model, images(4), ratios=0.5, refit=False)
    assert report.times['redundancy'] > 0 and report.times['qk_scoring'] > 0


@pytest.mark.parametrize('bias', [True, False])
def test_linear_fit_streams_batches(bias):
    """Accumulating XᵀX, XᵀR and the error sums over several batches gives the one-batch fit."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(300, 9, generator=g), torch.randn(4, 9, generator=g)
    y = x @ w.t() + 0.1 * torch.randn(300, 4, generator=g)
    layers = [nn.Linear(6, 4, bias=bias) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    one, many = LinearFit(layers[0]), LinearFit(layers[1])
    one.add(x[:, :6], y)
    for part in (slice(0, 7), slice(7, 200), slice(200, 300)):
        many.add(x[part, :6], y[part])
    s1, s2 = one.solve(), many.solve()
    assert s1.tokens == s2.tokens == 300 and s1.err_refit < 0.9 * s1.err_sliced
    assert s2.err_sliced == pytest.approx(s1.err_sliced, rel=1e-5) and s2.err_refit == pytest.approx(s1.err_refit, rel=1e-4)
    assert torch.allclose(layers[0].weight, layers[1].weight, atol=1e-5)
    if bias:
        assert torch.allclose(layers[0].bias, layers[1].bias, atol=1e-5)


def test_refit_solve_retries_with_jitter_then_falls_back_to_lstsq(monkeypatch):
    """A Gram that is singular at damp=0 (a zero input column) fails the first factorisation and is solved
    with the next jitter, from a rebuilt matrix; when every factorisation fails, the rank-revealing lstsq
    fallback gives the same fit (its orientation: ΔW, not ΔWᵀ)."""
    import importlib
    R = importlib.import_module('snp_fast.refit')
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 3] = 0
    y = x @ torch.randn(6, 3) + 0.1 * torch.randn(200, 3)

    def fit(layer):
        f = R.LinearFit(layer)
        f.add(x, y)
        return f.solve(damp=0.0)
    calls = []
    real = R.cholesky_solve_
    monkeypatch.setattr(R, 'cholesky_solve_', lambda a, b: calls.append(real(a, b)) or calls[-1])
    monkeypatch.setattr(torch.linalg, 'lstsq', lambda *a, **k: pytest.fail('lstsq fallback used'))
    base = nn.Linear(6, 3)
    a = copy.deepcopy(base)
    st = fit(a)
    assert calls[0] == 4 and calls[-1] == 0, calls  # minor 4 (the zero column) fails, the jitter succeeds
    assert st.err_refit < 0.05 * st.err_sliced and torch.isfinite(a.weight).all()
    monkeypatch.undo()
    monkeypatch.setattr(R, 'cholesky_solve_', lambda a, b: 1)  # every factorisation fails
    b = copy.deepcopy(base)
    st_b = fit(b)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.bias, a.bias, rtol=1e-4, atol=1e-5)
    assert st_b.err_refit == pytest.approx(st.err_refit, rel=1e-3)


def test_refit_never_increases_layer_error():
    model = tiny('deit_small_distilled_patch16_224')
    x = images(8)
    ratios = {'qk': 0.5, 'v': 0.5, 'mlp': 0.5, 'embed': 0.3}
    pruned, report = snp_fast.prune(model, x, ratios=ratios)
    sliced, _ = snp_fast.prune(model, x, ratios=ratios, refit=False)
    assert all(s.err_refit <= s.err_sliced + 1e-9 for s in report.refit.values())
    assert any(s.err_refit < 0.5 * s.err_sliced for s in report.refit.values())
    # independent check on blocks.0.attn.qkv, whose inputs are the same in both models
    e = torch.tensor(pruned.snp_recipe['selection']['embed'])
    sel = pruned.snp_recipe['selection']['blocks'][0]
    H, d = 6, 64
    q_rows = vit.head_rows(torch.tensor(sel['qk']), d)
    rows = torch.cat([q_rows, q_rows + H * d, vit.head_rows(torch.tensor(sel['v']), d) + 2 * H * d])
    with torch.no_grad():
        h0 = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        target = model.blocks[0].attn.qkv(model.blocks[0].norm1(h0))[..., rows]
        hp = sliced.norm_pre(sliced._pos_embed(sliced.patch_embed(x)))
        inp = sliced.blocks[0].norm1(hp)
        err_sliced = (sliced.blocks[0].attn.qkv(inp) - target).square().sum()
        err_refit = (pruned.blocks[0].attn.qkv(inp) - target).square().sum()
    assert err_refit <= err_sliced
    assert e.numel() == pruned.embed_dim


def test_quality_on_digits_refit_recovers_accuracy():
    """A ViT trained here on real digits (committed checkpoint, tests/make_digits_checkpoint.py):
    removing 50 % of q/k, v, fc1 AND embedding dims keeps accuracy within 2 points with the re-fit,
    while slicing alone loses far more."""
    from snp_fast.demo import accuracy, digits_data, load_digits_vit
    model = load_digits_vit()
    x_tr, _, x_te, y_te = digits_data()
    base = accuracy(model, x_te, y_te)
    assert base >= 0.95
    pruned, report = snp_fast.prune(model, x_tr[:256], ratios=0.5)
    assert pruned.embed_dim == 64 and report.macs_after < 0.3 * report.macs_before
    acc = accuracy(pruned, x_te, y_te)
    sliced, _ = snp_fast.prune(model, x_tr[:256], ratios=0.5, refit=False)
    acc_sliced = accuracy(sliced, x_te, y_te)
    assert acc >= base - 0.02, (base, acc)
    assert acc_sliced <= base - 0.2, (base, acc_sliced)


def test_bf16_precision_keeps_the_digits_selection_and_accuracy():
    """On the trained digits ViT, bf16 products (redundancy cosines, re-fit Grams) keep ≥ 99 % of the kept
    indices of the fp32 run and its accuracy (measured: 99.96 % of the indices, the same 95.8 %)."""
    from snp_fast.demo import accuracy, digits_data, load_digits_vit
    model = load_digits_vit()
    x_tr, _, x_te, y_te = digits_data()
    runs = {p: snp_fast.prune(model, x_tr[:256], ratios=0.5, precision=p)[0] for p in ('fp32', 'bf16')}

    def kept(m):
        s = m.snp_recipe['selection']
        out = {('embed', i) for i in s['embed']}
        for b, blk in enumerate(s['blocks']):
            for key, v in blk.items():
                rows = v if v and isinstance(v[0], list) else [v]
                out |= {(b, key, r, i) for r, row in enumerate(rows) for i in row}
        return out
    a, b = kept(runs['fp32']), kept(runs['bf16'])
    assert len(a & b) >= 0.99 * len(a), len(a & b) / len(a)
    acc = {p: accuracy(m, x_te, y_te) for p, m in runs.items()}
    assert acc['bf16'] >= acc['fp32'] - 0.005, acc


def test_oneshot_refit_fits_each_block_from_the_original_hidden_states():
    """refit="oneshot": the same selection, each block re-fit from the original stream at the kept channels
    (not the pruned model's): different weights from the sequential re-fit, both far better than none; the
    first block sees the same inputs either way, so its re-fit is identical."""
    from snp_fast.demo import accuracy, digits_data, load_digits_vit
    model = load_digits_vit()
    x_tr, _, x_te, y_te = digits_data()
    seq, _ = snp_fast.prune(model, x_tr[:64], ratios=0.5, refit=True)
    one, rep = snp_fast.prune(model, x_tr[:64], ratios=0.5, refit='oneshot')
    none, _ = snp_fast.prune(model, x_tr[:64], ratios=0.5, refit=False)
    assert rep.settings['refit'] == 'oneshot'
    assert torch.equal(seq.blocks[0].attn.qkv.weight, one.blocks[0].attn.qkv.weight)
    assert not torch.equal(seq.blocks[3].mlp.fc2.weight, one.blocks[3].mlp.fc2.weight)
    acc_none = accuracy(none, x_te, y_te)
    assert accuracy(one, x_te, y_te) > acc_none + 0.3 and accuracy(seq, x_te, y_te) > acc_none + 0.3
    with pytest.raises(ValueError, match='refit must be'):
        snp_fast.prune(model, x_tr[:4], ratios=0.5, refit='once')


# ------------------------------------------------------------------------------------------------
# save / load

def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny('deit3_small_patch16_224')
    x = images(4)
    pruned, report = snp_fast.prune(model, x, ratios={'qk': 0.4, 'v': 0.3, 'mlp': 0.6, 'embed': 0.25})
    out = snp_fast.save_pruned(pruned, str(tmp_path / 'm'), report=report)
    assert sorted(os.listdir(out)) == ['model.safetensors', 'recipe.json', 'report.json']
    loaded = snp_fast.load_pruned(out)
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))
    recipe = json.load(open(os.path.join(out, 'recipe.json')))
    assert recipe['timm_name'] == 'deit3_small_patch16_224' and recipe['dims_after']['embed'] == 288
    with pytest.raises(FileExistsError):
        snp_fast.save_pruned(pruned, out)


def _saved(tmp_path):
    model = tiny('deit_tiny_patch16_224')
    pruned, _ = snp_fast.prune(model, images(2), ratios=0.3)
    return snp_fast.save_pruned(pruned, str(tmp_path / 'm'))


def test_load_rejects_tampered_recipe(tmp_path):
    d = _saved(tmp_path)
    path = os.path.join(d, 'recipe.json')
    recipe = json.load(open(path))
    recipe['dims_after']['blocks'][1]['v'] += 1
    json.dump(recipe, open(path, 'w'))
    with pytest.raises(snp_fast.RecipeError, match='blocks.1.attn'):
        snp_fast.load_pruned(d)
    recipe['dims_after']['blocks'][1]['v'] -= 1
    recipe['timm_kwargs']['depth'] = 3
    json.dump(recipe, open(path, 'w'))
    with pytest.raises(snp_fast.RecipeError, match='pruned from'):
        snp_fast.load_pruned(d)
    recipe['format'] = 'something/9'
    json.dump(recipe, open(path, 'w'))
    with pytest.raises(snp_fast.RecipeError, match='unknown recipe format'):
        snp_fast.load_pruned(d)
    open(path, 'w').write('{not json')
    with pytest.raises(snp_fast.RecipeError, match='not valid JSON'):
        snp_fast.load_pruned(d)
    open(path, 'wb').write(b'{"format": "\xff\xfe"}')  # not UTF-8: named like any other bad recipe
    with pytest.raises(snp_fast.RecipeError, match='recipe.json is not valid JSON'):
        snp_fast.load_pruned(d)


def test_load_rejects_mismatched_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _saved(tmp_path)
    w = os.path.join(d, 'model.safetensors')
    state = load_file(w)
    state['head.weight'] = state['head.weight'][:, :-1].contiguous()
    save_file(state, w)
    with pytest.raises(snp_fast.RecipeError, match='head.weight'):
        snp_fast.load_pruned(d)
    del state['head.weight']
    save_file(state, w)
    with pytest.raises(snp_fast.RecipeError, match='missing'):
        snp_fast.load_pruned(d)
    with pytest.raises(snp_fast.RecipeError, match='not found'):
        snp_fast.load_pruned(str(tmp_path / 'nowhere'))


# ------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize('ratios,match', [(1.0, 'outside'), (-0.1, 'outside'), ({'qk': 1.2}, 'qk'),
                                          ({'blocks': [{}], 'embed': 0}, 'blocks'), ({'q': 0.1}, 'unknown keys'),
                                          (float('nan'), 'outside'), ('no_such_preset', 'unknown preset')])
def test_bad_ratios_are_refused(ratios, match):
    model = tiny('deit_tiny_patch16_224')
    with pytest.raises(ValueError, match=match):
        snp_fast.prune(model, images(2), ratios=ratios)


def test_a_misspelled_key_beside_blocks_is_refused_and_a_loaded_preset_is_taken():
    from snp_fast.families.vit import resolve_ratios
    blocks = [{'qk': .5}, {'qk': .25}]
    for typo in ({'embedding': .5}, {'drop_mpl': [1]}):
        with pytest.raises(ValueError, match=re.escape(f'unknown keys {sorted(typo)}')):
            resolve_ratios({'blocks': blocks, **typo}, 2)
    preset = snp_fast.load_preset('deit_small_patch16_224')  # with its description: model, note, ...
    assert resolve_ratios(preset, 12) == resolve_ratios('deit_small_patch16_224', 12)


def test_ratio_leaving_no_dims_keeps_one_and_says_so():
    model = tiny('deit_tiny_patch16_224')
    with pytest.warns(UserWarning, match='keeping 1'):
        pruned, report = snp_fast.prune(model, images(2), ratios={'qk': 0.999, 'v': 0.5})
    assert all(b.qk == 1 for b in report.dims_after.blocks)
    assert any('keeping 1' in n for n in report.notes)
    with torch.no_grad():
        assert torch.isfinite(pruned(images(1))).all()


def test_unsupported_model_names_what_is_supported():
    with pytest.raises(snp_fast.UnsupportedModelError, match='VisionTransformer'):
        snp_fast.prune(timm.create_model('resnet18', pretrained=False), images(1), ratios=0.5)
    with pytest.raises(snp_fast.UnsupportedModelError, match='VisionTransformer'):
        snp_fast.prune(nn.Linear(3, 3), images(1), ratios=0.5)
    m = timm.create_model('vit_small_patch16_224', pretrained=False, depth=1, img_size=64, global_pool='prr')
    with pytest.raises(snp_fast.UnsupportedModelError, match='AttentionPoolPrr'):
        snp_fast.prune(m, images(1), ratios=0.5)


def test_qk_norm_models_refuse_qk_pruning_only():
    model = tiny('vit_small_patch16_224', qk_norm=True)
    with pytest.raises(ValueError, match='qk_norm'):
        snp_fast.prune(model, images(2), ratios=0.5)
    pruned, _ = snp_fast.prune(model, images(2), ratios={'qk': 0, 'v': 0.5, 'mlp': 0.5, 'embed': 0.25})
    assert pruned.blocks[0].attn.qk_dim == 64 and pruned.blocks[0].attn.v_dim == 32


@pytest.mark.parametrize('calib,match', [(torch.randn(2, 3, 32, 32), 'model takes'), (torch.randn(2, 1, 64, 64), 'channels'),
                                         (torch.randn(3, 64, 64), r'\(B, C, H, W\)'),
                                         (torch.zeros(0, 3, 64, 64), r'\(B, C, H, W\)')])
def test_bad_calibration_batches_are_refused(calib, match):
    with pytest.raises(ValueError, match=match):
        snp_fast.prune(tiny('deit_tiny_patch16_224'), calib, ratios=0.5)


def test_nan_in_calibration_or_activations_names_the_block():
    model = tiny('deit_tiny_patch16_224')
    x = images(2)
    bad = x.clone()
    bad[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        snp_fast.prune(model, bad, ratios=0.5)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.bias[0] = float('nan')
    with pytest.raises(FloatingPointError, match=r'blocks\.1'):
        snp_fast.prune(model, x, ratios=0.5)


def test_missing_calibration_is_explained():
    with pytest.raises(ValueError, match='calibration images are needed'):
        snp_fast.prune(tiny('deit_tiny_patch16_224'), None, ratios=0.5)


def test_original_model_is_untouched():
    model = tiny('deit_tiny_patch16_224')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    snp_fast.prune(model, images(2), ratios=0.5)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_level_backend_is_a_preference():
    """prune(backend=X) runs every op on X where it has X for the model's device and on its fastest
    kernel otherwise (Triton has no Q/K or slicing kernel): the same model as backend="auto"; a backend
    with no kernel at all for the device is refused before any work."""
    from snp_fast import ops
    model, x = tiny('deit_tiny_patch16_224', depth=1, img_size=32), images(2, size=32)
    auto, _ = snp_fast.prune(model, x, ratios=0.5, refit=False)
    chosen = []
    real = ops.dispatch._TABLE['redundancy_scores']
    try:  # record which implementation the redundancy scores resolve to
        ops.dispatch._TABLE['redundancy_scores'] = {
            b: (lambda fn, b: lambda w: (chosen.append(b), fn(w))[1])(fn, b) for b, fn in real.items()}
        for backend in ['reference'] + (['triton'] if 'triton' in ops.available_backends('redundancy_scores', 'cpu')
                                        else []):
            chosen.clear()
            pruned, _ = snp_fast.prune(model, x, ratios=0.5, refit=False, backend=backend)
            assert chosen and set(chosen) == {backend}
            assert pruned.snp_recipe['selection'] == auto.snp_recipe['selection'], backend
            for (n, a), b in zip(pruned.state_dict().items(), auto.state_dict().values()):
                assert torch.allclose(a, b, atol=1e-6), (backend, n)
    finally:
        ops.dispatch._TABLE['redundancy_scores'] = real
    with pytest.raises(ValueError, match="backend='cuda' has no kernel for a model on cpu"):
        snp_fast.prune(model, x, ratios=0.5, backend='cuda')
    with pytest.raises(ValueError, match='not known'):
        snp_fast.prune(model, x, ratios=0.5, backend='gpu')


def test_compiled_extension_slices_like_the_reference():
    from snp_fast import ops
    if 'compiled' not in ops.available_backends('gather_slices', 'cpu'):
        pytest.skip('compiled extension not built')
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(7, 5, 3, generator=g), torch.randn(11, 13, generator=g), torch.randn(1, 9, 4, generator=g)]
    sl = [[(0, torch.tensor([6, 0, 2]))], [(1, torch.tensor([12, 1])), (0, torch.tensor([3, 4, 10]))],
          [(2, torch.tensor([3])), (1, torch.tensor([8, 0]))]]
    for a, b in zip(ops.gather_slices(ts, sl, backend='compiled'), ops.gather_slices(ts, sl, backend='reference')):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match='out of range'):
        ops.gather_slices(ts[:1], [[(0, torch.tensor([7]))]], backend='cpu')


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'vit_medium_patch16_reg4_gap_256'])
def test_auto_backend_selects_the_same_filters_as_reference(name):
    model = tiny(name)
    x = images(4, size=model.patch_embed.img_size[0])
    ratios = {'qk': 0.5, 'v': 0.4, 'mlp': 0.3, 'embed': 0.25}
    auto, _ = snp_fast.prune(model, x, ratios=ratios, refit=False, backend='auto')
    ref, _ = snp_fast.prune(model, x, ratios=ratios, refit=False, backend='reference')
    assert auto.snp_recipe['selection'] == ref.snp_recipe['selection']


def test_bf16_precision_selects_like_the_reference_on_rounded_inputs(monkeypatch):
    """precision="bf16": the compiled kernels (MKL's bf16 GEMM here) select what the pure-Python version
    selects from the same bf16-rounded inputs; the setting is recorded, and the re-fit still runs (its
    bordered Gram stays positive definite: every fit is solved, none falls back)."""
    model = tiny('deit_tiny_patch16_224')
    x = images(4)
    ratios = {'qk': 0.5, 'v': 0.4, 'mlp': 0.3, 'embed': 0.25}
    monkeypatch.setattr(torch.linalg, 'lstsq', lambda *a, **k: pytest.fail('a re-fit fell back to lstsq'))
    auto, rep = snp_fast.prune(model, x, ratios=ratios, refit=True, precision='bf16')
    ref, _ = snp_fast.prune(model, x, ratios=ratios, refit=False, backend='reference', precision='bf16')
    assert auto.snp_recipe['selection'] == ref.snp_recipe['selection']
    assert rep.settings['precision'] == 'bf16' and auto.snp_recipe['settings']['precision'] == 'bf16'
    assert all(s.err_refit < s.err_sliced for s in rep.refit.values())
    with pytest.raises(ValueError, match="precision='fp16'"):
        snp_fast.prune(model, x, ratios=ratios, precision='fp16')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('refit', [False, True])
def test_cuda_prune_selects_the_same_filters_as_cpu_reference(refit):
    """The whole prune on a GPU (its kernels: cuBLAS / Triton / the hybrid Q/K scores) against the
    pure-Python version on the CPU: the same filters, and with re-fit the same outputs to rounding."""
    model = tiny('deit_tiny_patch16_224')
    x = images(4)
    ratios = {'qk': 0.5, 'v': 0.4, 'mlp': 0.3, 'embed': 0.25}
    ref, _ = snp_fast.prune(model, x, ratios=ratios, refit=refit, backend='reference')
    gpu, _ = snp_fast.prune(model.cuda(), x.cuda(), ratios=ratios, refit=refit)
    assert gpu.snp_recipe['selection'] == ref.snp_recipe['selection']
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), ref(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_small_patch16_224',
                                  pytest.param('vit_large_patch16_224', marks=pytest.mark.slow)])
def test_full_size_models_prune_and_run(name):
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    pruned, report = snp_fast.prune(model, x, ratios={'qk': 0.5, 'v': 0.5, 'mlp': 0.5, 'embed': 0.25})
    assert report.macs_after < 0.5 * report.macs_before
    with torch.no_grad():
        assert pruned(x).shape == (2, 1000)


def test_round_trip_keeps_every_timm_option(tmp_path):
    """load_pruned rebuilds from timm's recorded kwargs: non-default activation and pooling survive."""
    model = tiny('deit_tiny_patch16_224', act_layer='relu', global_pool='avg', pool_include_prefix=True)
    x = images(3)
    pruned, _ = snp_fast.prune(model, x, ratios=0.4)
    loaded = snp_fast.load_pruned(snp_fast.save_pruned(pruned, str(tmp_path / 'm')))
    assert isinstance(loaded.blocks[0].mlp.act, nn.ReLU) and loaded.pool_include_prefix
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))


def test_round_trip_after_reset_classifier_pooling(tmp_path):
    """reset_classifier(global_pool=...) is not in timm's recorded kwargs: the recipe says it (with the final
    norm the model kept), or the loaded model would pool differently."""
    model = tiny('vit_tiny_patch16_224')
    model.reset_classifier(10, global_pool='avg')
    x = images(3)
    pruned, _ = snp_fast.prune(model, x, ratios={'mlp': 0.5})
    assert pruned.snp_recipe['timm_kwargs']['global_pool'] == 'avg'
    loaded = snp_fast.load_pruned(snp_fast.save_pruned(pruned, str(tmp_path / 'm')))
    with torch.no_grad():
        assert torch.equal(pruned(x), loaded(x))


def test_weights_with_another_saves_recipe_are_refused(tmp_path):
    """3 heads of 32 q/k/v dims and 2 heads of 48 give the same tensor shapes: only the recorded structure
    tells a recipe.json copied from another save apart."""
    import shutil
    model = tiny('deit_tiny_patch16_224')  # 3 heads of 64
    x = images(3)
    a, _ = snp_fast.prune(model, x, ratios={'qk': 0.5, 'v': 0.5, 'mlp': 0.5}, refit=False)
    b, _ = snp_fast.prune(model, x, ratios={'heads': 0.34, 'qk': 0.25, 'v': 0.25, 'mlp': 0.5}, refit=False)
    da, db = snp_fast.save_pruned(a, str(tmp_path / 'a')), snp_fast.save_pruned(b, str(tmp_path / 'b'))
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    shutil.copy(os.path.join(da, 'recipe.json'), os.path.join(db, 'recipe.json'))
    with pytest.raises(snp_fast.RecipeError, match="another pruned structure"):
        snp_fast.load_pruned(db)


def test_failed_save_puts_the_previous_one_back(tmp_path, monkeypatch):
    model = tiny('deit_tiny_patch16_224')
    pruned, _ = snp_fast.prune(model, images(2), ratios=0.3, refit=False)
    d = snp_fast.save_pruned(pruned, str(tmp_path / 'm'))
    before = sorted(os.listdir(d))
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the old directory moves aside, then putting the new one in place fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError('disk full')
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match='disk full'):
        snp_fast.save_pruned(pruned, d, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(d)) == before
    assert sorted(os.listdir(tmp_path)) == ['m']  # no temporary directory left behind
    snp_fast.load_pruned(d)


def test_half_precision_activation_sums_do_not_read_as_overflow():
    """The finiteness check of the activations sums in fp32: an fp16 sum of finite activations with a
    large-mean channel overflows past 65504 and was reported as NaN/Inf."""
    model = tiny('deit_tiny_patch16_224')
    with torch.no_grad():
        model.patch_embed.proj.bias[0] = 3000.0
    model = model.half()
    x = images(8).half()
    with torch.no_grad():
        assert torch.isfinite(model.blocks[0](model._pos_embed(model.patch_embed(x)))).all()
    pruned, report = snp_fast.prune(model, x, ratios=0.3, refit=False)
    assert report.macs_after < report.macs_before
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()


def test_onnx_check_feeds_the_models_dtype(tmp_path):
    """An fp16 model exports an fp16 graph: the check feeds it fp16 images (it fed float32 and failed);
    bfloat16, which ONNX Runtime's CPU kernels do not run, is refused with the way out."""
    pytest.importorskip('onnxruntime')
    from snp_fast.export import check_onnx, export_onnx
    pruned, _ = snp_fast.prune(tiny('deit_tiny_patch16_224', depth=1), images(2), ratios=0.3, refit=False)
    half = pruned.half()
    assert check_onnx(half, export_onnx(half, str(tmp_path / 'h.onnx'))) < 1e-2
    with pytest.raises(ValueError, match='float32 copy'):
        check_onnx(pruned.bfloat16(), str(tmp_path / 'h.onnx'))


def test_model_timm_cannot_rebuild_is_refused_at_save(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    pruned, _ = snp_fast.prune(model, torch.randn(2, 3, 32, 32), ratios=0.5)
    with pytest.raises(ValueError, match='timm_name'):
        snp_fast.save_pruned(pruned, str(tmp_path / 'm'))
    assert not (tmp_path / 'm').exists()
    pruned, _ = snp_fast.prune(model, torch.randn(2, 3, 32, 32), ratios=0.5, timm_name='vit_tiny_patch16_224',
                               timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                num_classes=3))
    loaded = snp_fast.load_pruned(snp_fast.save_pruned(pruned, str(tmp_path / 'm')))
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(pruned(x), loaded(x))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_models_prune(dtype):
    model = tiny('deit_tiny_patch16_224').to(dtype)
    x = images(4).to(dtype)
    ratios = {'qk': 0.5, 'v': 0.5, 'mlp': 0.5, 'embed': 0.25}
    pruned, report = snp_fast.prune(model, x, ratios=ratios)
    sliced, _ = snp_fast.prune(model, x, ratios=ratios, refit=False)
    assert next(pruned.parameters()).dtype == dtype and report.macs_after < report.macs_before
    with torch.no_grad():
        ref, out, out_sliced = model(x).float(), pruned(x).float(), sliced(x).float()
    assert torch.isfinite(out).all()
    # the re-fit keeps it close to the original: measured 3e-4 (fp16) / 2e-3 (bf16) of the sliced model's error
    assert (out - ref).norm() < 0.05 * (out_sliced - ref).norm()


def test_prune_keeps_what_the_reference_scores_rank_highest():
    """The selection, block by block, against the plain-PyTorch scores of the same activations and weights:
    the literal Q/K formula with the given gamma, |cos| redundancy of the value filters (all heads compete,
    per-head keep counts) and of fc1's rows. The slice == mask tests accept any selection; this one pins it."""
    from snp_fast.ops import reference

    def top(scores, keep):  # the highest `keep` scores (per row), ascending indices; not snp_fast's own helpers
        return scores.argsort(dim=-1, descending=True)[..., :keep].sort(dim=-1).values

    model = tiny('deit_tiny_patch16_224')
    x = images(4)
    qkv_out = {}
    hooks = [blk.attn.qkv.register_forward_hook(lambda m, i, o, j=j: qkv_out.__setitem__(j, o.detach()))
             for j, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)  # (no embedding pruned and no re-fit: every block's scores come from these activations)
    for h in hooks:
        h.remove()
    gamma = 1
    pruned, _ = snp_fast.prune(model, x, ratios={'qk': .5, 'v': .5, 'mlp': .5}, gamma=gamma, refit=False)
    for j, (blk, sel) in enumerate(zip(model.blocks, pruned.snp_recipe['selection']['blocks'])):
        H, d = blk.attn.num_heads, blk.attn.head_dim
        q, k, _ = qkv_out[j].view(4, -1, 3, H, d).permute(2, 0, 3, 1, 4)
        scores = reference.qk_scores_literal(q, k, gamma)
        assert torch.equal(torch.tensor(sel['qk']), top(scores, d // 2)), f'blocks.{j} q/k'
        # gamma reaches the scores: with every component (the default, gamma = kept dims) another selection
        assert not torch.equal(top(reference.qk_scores_literal(q, k, d // 2), d // 2), torch.tensor(sel['qk']))
        v_rows = blk.attn.qkv.weight[2 * H * d:]
        v_scores = reference.redundancy_scores_full(v_rows).view(H, d)
        assert torch.equal(torch.tensor(sel['v']), top(v_scores, d // 2)), f'blocks.{j} v'
        fc1_scores = reference.redundancy_scores_full(blk.mlp.fc1.weight)
        assert torch.equal(torch.tensor(sel['mlp']), top(fc1_scores, blk.mlp.fc1.out_features // 2))


def test_other_criteria_gamma_and_token_budget():
    model = tiny('deit3_small_patch16_224')
    x = images(4)
    pruned, report = snp_fast.prune(model, x, ratios={'qk': 0.5, 'v': 0.5, 'mlp': 0.5, 'embed': 0.25}, gamma=3,
                                    v_criterion='activation', mlp_criterion='activation',
                                    embed_criterion='activation', refit_tokens=40)
    assert all(s.tokens == 40 for k, s in report.refit.items() if k.startswith('blocks'))
    assert pruned.embed_dim == 288 and pruned.blocks[1].attn.v_dim == 32
    assert report.settings['gamma'] == 3


@pytest.mark.parametrize('kwargs,match', [(dict(refit_tokens=0), 'refit_tokens'), (dict(refit_tokens=-5), 'refit_tokens'),
                                          (dict(damp=float('nan')), 'damp'), (dict(damp=-1.0), 'damp'),
                                          (dict(ratios={'blocks': [{}, {}], 'mlp': 0.9}), 'both'),
                                          (dict(qk_criterion='l1'), 'qk_criterion'), (dict(gamma=0), 'gamma'),
                                          (dict(backend='tpu'), 'backend')])
def test_bad_settings_are_refused_up_front(kwargs, match):
    kwargs.setdefault('ratios', 0.5)
    with pytest.raises(ValueError, match=match):
        snp_fast.prune(tiny('deit_tiny_patch16_224'), images(2), **kwargs)


@pytest.mark.parametrize('name', ['deit_small_distilled_patch16_224', 'vit_medium_patch16_reg4_gap_256',
                                  'deit3_small_patch16_224'])
def test_embedding_slice_equals_mask_without_norms(name):
    """Every tensor coupled to the residual stream loses the same channels: with the norms taken out
    (they are the only thing that mixes stream channels), zeroing the removed channels in every producer
    of the stream gives exactly the sliced model."""
    model = tiny(name)
    for mod_name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(mod, child_name, nn.Identity())
    x = images(3, size=model.patch_embed.img_size[0])
    ratios = random_ratios(len(model.blocks), seed=5, embed=0.4)
    pruned, _ = snp_fast.prune(model, x, ratios=ratios, refit=False)
    sel = pruned.snp_recipe['selection']
    twin = masked_twin(model, sel)
    drop = torch.ones(model.embed_dim, dtype=torch.bool)
    drop[torch.tensor(sel['embed'])] = False
    with torch.no_grad():
        twin.patch_embed.proj.weight[drop] = 0
        twin.patch_embed.proj.bias[drop] = 0
        for tok in ('cls_token', 'reg_token', 'dist_token', 'pos_embed'):
            if getattr(twin, tok, None) is not None:
                getattr(twin, tok)[..., drop] = 0
        for blk in twin.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight[drop] = 0
                lin.bias[drop] = 0
    assert pruned.embed_dim == model.embed_dim - int(drop.sum())
    with torch.no_grad():
        a, b = pruned(x), twin(x)
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
