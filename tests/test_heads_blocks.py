"""Head pruning ('heads' ratios, head_criterion=) and branch dropping ('drop_attn' / 'drop_mlp')."""
import copy

import pytest
import timm
import torch

import snp_fast
from snp_fast.allocate import ratios_for_dims
from snp_fast.io import load_pruned, save_pruned
from snp_fast.macs import count_macs, meta_copy
from snp_fast.families import vit
from snp_fast.families.vit import Selection
from snp_fast.families.vit import branch_scores
from snp_fast.families.vit import resolve_ratios, target_dims

pytestmark = pytest.mark.filterwarnings('ignore:snp_fast. .*reference')

SPEC = {'heads': 0.5, 'qk': 0.5, 'v': 0.25, 'mlp': 0.5}


def tiny(name='vit_small_patch16_224', depth=3, **kw):
    """6 heads of 64 dims, 64×64 input (17 tokens): small, but with heads to choose from."""
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, depth=depth, img_size=64, num_classes=10, **kw)
    with torch.no_grad():  # timm leaves biases at zero: randomise so nothing is trivially equal
        for n, p in m.named_parameters():
            if n.endswith('bias') or 'gamma' in n or n.endswith('token'):
                p.normal_(0, 0.2)
    return m.eval()


def images(n=4):
    return torch.randn(n, 3, 64, 64)


def masked_twin(model, selection):
    """The original model with every removed head (its q/k/v rows), q/k/v dim and fc1 neuron zeroed.

    A head whose q, k and v are all zero attends uniformly to zero values: it adds nothing to proj,
    exactly as a sliced-away head; a dropped branch is the case with no head (no neuron) left."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for blk, sel in zip(twin.blocks, Selection.from_dict(selection).blocks):
            H, d = blk.attn.num_heads, blk.attn.head_dim
            keep = torch.zeros(3 * H * d, dtype=torch.bool)
            q = vit.head_rows(sel.qk, d, heads=sel.heads)
            keep[torch.cat([q, q + H * d, vit.head_rows(sel.v, d, 2 * H * d, sel.heads)])] = True
            blk.attn.qkv.weight[~keep] = 0
            blk.attn.qkv.bias[~keep] = 0
            keep_m = torch.zeros(blk.mlp.fc1.out_features, dtype=torch.bool)
            keep_m[sel.mlp] = True
            blk.mlp.fc1.weight[~keep_m] = 0
            blk.mlp.fc1.bias[~keep_m] = 0
    return twin


def _close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= tol, f'max abs difference {err:.3g} > {tol}'


# ------------------------------------------------------------------------------------------------
# head pruning

@pytest.mark.parametrize('criterion', ['output', 'snp'])
def test_head_pruned_equals_masked_twin(criterion):
    model, x = tiny(), images()
    pruned, report = snp_fast.prune(model, x, ratios=SPEC, head_criterion=criterion, refit=False)
    sel = pruned.snp_recipe['selection']
    assert [b.heads for b in report.dims_after.blocks] == [3, 3, 3]
    assert all(len(b['heads']) == 3 and b['heads'] == sorted(b['heads']) for b in sel['blocks'])
    with torch.no_grad():
        _close(pruned(x), masked_twin(model, sel)(x))
    assert pruned.blocks[0].attn.scale == model.blocks[0].attn.scale


@pytest.mark.parametrize('criterion', ['output', 'snp'])
def test_selected_heads_follow_the_score(criterion):
    """A head made weak for the criterion (its proj columns for "output", its queries for "snp") goes
    first, and the kept heads are exactly the top ones of the criterion's score."""
    model, x = tiny(depth=1), images()
    H, d = 6, 64
    weak = [1, 4]
    with torch.no_grad():
        for h in weak:
            if criterion == 'output':
                model.blocks[0].attn.proj.weight[:, h * d:(h + 1) * d] *= 1e-3
            else:
                model.blocks[0].attn.qkv.weight[h * d:(h + 1) * d] *= 1e-3
                model.blocks[0].attn.qkv.bias[h * d:(h + 1) * d] *= 1e-3
    pruned, _ = snp_fast.prune(model, x, ratios={'heads': 2 / 6}, head_criterion=criterion, refit=False)
    kept = pruned.snp_recipe['selection']['blocks'][0]['heads']
    assert kept == [h for h in range(H) if h not in weak]


def test_head_scores_match_their_definitions():
    """head_energy = top-γ σ² of Q_h K_hᵀ formed explicitly; head_output = ‖ctx_h W_hᵀ‖² formed explicitly."""
    from snp_fast.scores import head_energy, head_output
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 5, generator=g), torch.randn(2, 3, 9, 5, generator=g)
    want = torch.linalg.svdvals(q.double() @ k.double().transpose(-1, -2))[..., :2].pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(head_energy(q, k, 2), want.float(), rtol=1e-5, atol=0)
    ctx, w = torch.randn(2, 9, 15, generator=g), torch.randn(7, 15, generator=g)
    want = torch.stack([(ctx[..., h * 5:(h + 1) * 5] @ w[:, h * 5:(h + 1) * 5].t()).pow(2).sum() for h in range(3)])
    torch.testing.assert_close(head_output(ctx, w, 3), want, rtol=1e-5, atol=0)


def test_head_pruning_dims_params_and_macs():
    model, x = tiny(), images()
    pruned, report = snp_fast.prune(model, x, ratios={'heads': 0.5, 'qk': 0.25, 'v': 0.5, 'drop_mlp': [2]},
                                    refit=False)
    D, N, H, d, M = 384, 17, 6, 64, 1536
    a = pruned.blocks[0].attn
    assert (a.num_heads, a.qk_dim, a.v_dim) == (3, 48, 32)
    assert tuple(a.qkv.weight.shape) == (3 * (2 * 48 + 32), D) and tuple(a.proj.weight.shape) == (D, 3 * 32)
    assert pruned.blocks[2].mlp.fc1.out_features == 0 and pruned.blocks[2].mlp.fc2.in_features == 0

    def attn_macs(h, dqk, dv):  # qkv, QKᵀ, AV, proj
        return N * D * h * (2 * dqk + dv) + N * N * h * (dqk + dv) + N * h * dv * D
    saved = 3 * (attn_macs(H, d, d) - attn_macs(3, 48, 32)) + N * 2 * D * M
    assert report.macs_before - report.macs_after == saved
    assert count_macs(pruned) == report.macs_after
    removed = 3 * ((D + 1) * (3 * H * d - 3 * (2 * 48 + 32)) + D * (H * d - 3 * 32)) + D * M + M + M * D
    assert report.params_before - report.params_after == removed


# ------------------------------------------------------------------------------------------------
# branch dropping

def test_dropped_branches_equal_masked_twin_and_output_a_constant():
    model, x = tiny(), images()
    pruned, report = snp_fast.prune(model, x, ratios={'qk': 0.25, 'drop_attn': [0, 2], 'drop_mlp': [1]},
                                    refit=False)
    assert [(b.heads, b.mlp) for b in report.dims_after.blocks] == [(0, 1536), (6, 0), (0, 1536)]
    with torch.no_grad():
        _close(pruned(x), masked_twin(model, pruned.snp_recipe['selection'])(x))
        t = torch.randn(2, 17, 384)
        # the zero-width limit: the branch returns its (original) output bias, whatever its input
        _close(pruned.blocks[0].attn(t), model.blocks[0].attn.proj.bias.expand(2, 17, 384), 0)
        _close(pruned.blocks[1].mlp(t), model.blocks[1].mlp.fc2.bias.expand(2, 17, 384), 0)
    assert 'blocks.0.attn.qkv.weight' in pruned.state_dict()  # zero-width, so the recipe reloads by name


def test_dropped_branch_refit_is_the_mean_original_output():
    """With the re-fit, a dropped branch's constant is the least-squares one: the mean of the original
    branch output over the calibration tokens."""
    model, x = tiny(), images()
    pruned, _ = snp_fast.prune(model, x, ratios={'drop_attn': [1], 'drop_mlp': [2]})
    outs = {}
    hooks = [model.blocks[1].attn.proj.register_forward_hook(lambda m, i, o: outs.setdefault('attn', o)),
             model.blocks[2].mlp.fc2.register_forward_hook(lambda m, i, o: outs.setdefault('mlp', o))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(pruned.blocks[1].attn.proj.bias, outs['attn'].double().mean((0, 1)).float())
    torch.testing.assert_close(pruned.blocks[2].mlp.fc2.bias, outs['mlp'].double().mean((0, 1)).float())


def test_drop_counts_pick_the_least_contributing_branches():
    model, x = tiny(depth=4), images()
    attn, mlp = branch_scores(model, x)
    assert attn.shape == mlp.shape == (4,) and (attn > 0).all()
    with torch.no_grad():
        s = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        b = model.blocks[0]
        # "norm", on block 0: ‖attn branch‖ / ‖stream entering it‖
        torch.testing.assert_close(branch_scores(model, x, criterion='norm')[0][0],
                                   (b.ls1(b.attn(b.norm1(s))).norm() / s.norm()))
        # "ablation", on the last MLP: the final features with that branch replaced by its mean output
        last = model.blocks[-1]
        h = s
        for blk in model.blocks[:-1]:
            h = blk(h)
        h = h + last.ls1(last.attn(last.norm1(h)))
        ref = model.norm(h + last.ls2(last.mlp(last.norm2(h))))
        mean = last.ls2(last.mlp(last.norm2(h))).mean(dim=(0, 1))
        want = (model.norm(h + mean) - ref).double().norm() / ref.double().norm()
        torch.testing.assert_close(mlp[-1], want.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match='criterion'):
        branch_scores(model, x, criterion='size')
    pruned, report = snp_fast.prune(model, x, ratios={'drop_attn': 2, 'drop_mlp': 1}, refit=False)
    spec = pruned.snp_recipe['settings']['ratios']
    assert spec['drop_attn'] == sorted(attn.argsort()[:2].tolist())
    assert spec['drop_mlp'] == [int(mlp.argmin())]
    assert any('drop_attn' in n for n in report.notes)


def test_refit_still_works_after_drops_and_head_pruning():
    model, x = tiny(), images(8)
    ratios = {'heads': 0.5, 'qk': 0.5, 'mlp': 0.5, 'drop_mlp': [2]}
    plain, _ = snp_fast.prune(model, x, ratios=ratios, refit=False)
    fitted, report = snp_fast.prune(model, x, ratios=ratios)
    with torch.no_grad():
        ref = model(x)
        err_plain, err_fit = [(m(x) - ref).norm() / ref.norm() for m in (plain, fitted)]
    assert err_fit < 0.5 * err_plain
    assert 'blocks.0.attn.proj' in report.refit and 'blocks.2.mlp.fc1' not in report.refit


# ------------------------------------------------------------------------------------------------
# recipes, save/load, backends

def test_save_load_round_trip_is_exact(tmp_path):
    model, x = tiny(), images()
    pruned, _ = snp_fast.prune(model, x, ratios={**SPEC, 'drop_attn': [1], 'drop_mlp': [0]})
    save_pruned(pruned, str(tmp_path / 'm'))
    loaded = load_pruned(str(tmp_path / 'm'))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert vit.model_dims(loaded) == vit.model_dims(pruned)


def test_recipe_selection_rebuilds_the_model_and_old_recipes_mean_all_heads():
    model, x = tiny(), images()
    pruned, _ = snp_fast.prune(model, x, ratios={**SPEC, 'drop_attn': [2]}, refit=False)
    sel = Selection.from_dict(pruned.snp_recipe['selection'])
    assert sel.to_dict() == pruned.snp_recipe['selection']
    assert sel.dims() == vit.model_dims(pruned)
    again, _ = snp_fast.prune(model, None, selection=sel, refit=False)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    # a recipe written before head pruning has no 'heads': all heads, same slicing
    full, _ = snp_fast.prune(model, x, ratios={'qk': 0.5}, refit=False)
    old = copy.deepcopy(full.snp_recipe['selection'])
    for b in old['blocks']:
        del b['heads']
    assert Selection.from_dict(old).to_dict() == full.snp_recipe['selection']
    # the recorded ratios (drop counts resolved to indices) give the same widths again
    spec = pruned.snp_recipe['settings']['ratios']
    assert target_dims(vit.model_dims(model), resolve_ratios(spec, 3), []) == vit.model_dims(pruned)
    assert target_dims(vit.model_dims(model), resolve_ratios(ratios_for_dims(vit.model_dims(model),
                                                                             vit.model_dims(pruned)), 3), []) \
        == vit.model_dims(pruned)


@pytest.mark.parametrize('criterion', ['output', 'snp'])
def test_auto_backend_selects_the_same_as_reference(criterion):
    model, x = tiny(), images()
    ratios = {**SPEC, 'drop_mlp': 1}
    a, _ = snp_fast.prune(model, x, ratios=ratios, head_criterion=criterion, backend='auto', refit=False)
    b, _ = snp_fast.prune(model, x, ratios=ratios, head_criterion=criterion, backend='reference', refit=False)
    assert a.snp_recipe['selection'] == b.snp_recipe['selection']


@pytest.mark.parametrize('ratios, kwargs, match', [
    ({'heads': 1.0}, {}, r'heads = 1.0 is outside \[0, 1\)'),
    ({'blocks': [{'heads': -0.1}] * 3}, {}, r'blocks\[0\].heads'),
    ({'drop_attn': [3]}, {}, r'drop_attn: block indices \[3\] outside \[0, 2\]'),
    ({'drop_mlp': [1, 1]}, {}, 'repeated block indices'),
    ({'drop_mlp': 4}, {}, r'drop_mlp=4: a number of blocks must be in \[0, 3\]'),
    ({'drop_attn': 'first'}, {}, 'drop_attn must be a number of blocks'),
    ({'drop_attn': [0.5]}, {}, 'drop_attn must be a number of blocks'),
    ({'qk': 0.5}, {'head_criterion': 'norm'}, "head_criterion='norm' is not a known criterion"),
    ({'drop_attn': 1}, {'calib': None}, 'drop_attn / drop_mlp given as a number of blocks need calibration'),
    ({'heads': 0.5}, {'calib': None}, r'head pruning .* calib='),
])
def test_bad_head_and_drop_specs_are_refused(ratios, kwargs, match):
    model = tiny()
    calib = kwargs.pop('calib', images(2))
    with pytest.raises(ValueError, match=match):
        snp_fast.prune(model, calib, ratios=ratios, refit=calib is not None, qk_criterion='magnitude', **kwargs)


def test_drop_counts_cannot_size_a_model_without_scores():
    with pytest.raises(ValueError, match='prune\\(\\) picks them from calibration scores'):
        target_dims(vit.model_dims(tiny()), resolve_ratios({'drop_mlp': 2}, 3), [])


# ------------------------------------------------------------------------------------------------
# the DeiT-B "SNP + Head" 3.5 GMACs preset (ours)

def _deit_base_dims(spec):
    model = timm.create_model('deit_base_patch16_224', pretrained=False, device='meta')
    return model, target_dims(vit.model_dims(model), resolve_ratios(spec, 12), [])


def test_deit_base_snp_head_preset_hits_3p5_gmacs():
    preset = snp_fast.load_preset('deit_base_patch16_224_snp_head_3p5G')
    model, dims = _deit_base_dims('deit_base_patch16_224_snp_head_3p5G')
    assert all(b.heads == 6 for b in dims.blocks)
    macs = snp_fast.count_macs(vit.apply_dims(meta_copy(model), dims))
    assert abs(macs / 3.5e9 - 1) <= 0.02
    assert round(macs / 1e9, 3) == preset['gmacs']


@pytest.mark.slow
def test_deit_base_snp_head_preset_is_what_its_search_gives():
    from snp_fast.allocate import allocate
    model, dims = _deit_base_dims('deit_base_patch16_224_snp_head_3p5G')
    assert allocate(model, 3.5e9, heads=0.5).dims == dims


def test_branch_scores_and_mlp_dropping_work_for_the_eva_family():
    """Eva blocks hand RoPE tables to their attention and name their LayerScale gamma_1/gamma_2: the branch
    scores go through the same block arguments; dropping an MLP works, dropping a RoPE attention is refused."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_dinov3_qkvb', pretrained=False, depth=3, img_size=32, patch_size=8,
                              embed_dim=64, num_heads=4, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    attn, mlp = branch_scores(model, x)
    assert torch.isfinite(attn).all() and torch.isfinite(mlp).all()
    pruned, _ = snp_fast.prune(model, x, ratios={'drop_mlp': 1})
    assert pruned.snp_recipe['settings']['ratios']['drop_mlp'] == [int(mlp.argmin())]
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()
    with pytest.raises(ValueError, match='RoPE attention'):
        snp_fast.prune(model, x, ratios={'drop_attn': [0]})
