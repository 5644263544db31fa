"""SNP on timm EfficientFormer (V1): exactness at ratio 0, slice == mask, re-fit, save/load, errors, presets.

A tiny efficientformer_l1 (stage widths 8/16/24/32, one block per Meta4D stage, one attention block) keeps
these fast; its input stays 224x224 because the attention biases are built for a 7x7 token grid.
"""
import copy

import pytest
import timm
import torch

import snp_fast
from snp_fast.macs import count_macs, meta_copy
from snp_fast.families import efficientformer as ef

RATIOS = {'qk': .5, 'v': .5, 'mlp': .5, 'heads': .25, 'embed': .25}


def tiny_efficientformer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model('efficientformer_l1', pretrained=False, depths=(1, 1, 1, 2), embed_dims=(8, 16, 24, 32),
                          num_classes=10).eval()
    with torch.no_grad():  # timm's init (LayerScale 1e-5, std .02 Linears, unit BN stats) makes blocks ~identity
        for n, p in m.named_parameters():
            if p.dim() == 2:  # Linear weights: q·k large enough that the attention scores matter
                p.normal_(0, p.shape[1] ** -.5)
            elif 'gamma' in n:
                p.uniform_(.5, 1.)
            elif 'attention_biases' in n:
                p.normal_()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, .1)
                mod.running_var.uniform_(.5, 1.5)
                mod.weight.normal_(1, .2)
                mod.bias.normal_(0, .1)
    return m


@pytest.fixture(scope='module')
def model():
    return tiny_efficientformer()


@pytest.fixture(scope='module')
def calib():
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def held_out():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def _run(m, x):
    with torch.no_grad():
        return m(x)


def test_ratio_zero_is_the_original(model, calib):
    pruned, report = snp_fast.prune(model, calib, 0.0)
    assert report.dims_after == report.dims_before
    assert torch.equal(_run(pruned, calib), _run(model, calib))
    assert pruned.snp_recipe['family'] == 'efficientformer'


def _masked_twin(model, recipe):
    """The original model with the removed filters zeroed where the sliced model has an exact twin."""
    twin = copy.deepcopy(model)
    sel, dims = recipe['selection'], ef.EfficientFormerDims.from_dict(recipe['dims_before'])
    keep = lambda kept, n: torch.tensor(sorted(set(range(n)) - set(kept)), dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        for bd, bs in zip(dims.blocks, sel['blocks']):
            blk = twin.get_submodule(bd.name)
            blk.mlp.fc2.weight[:, keep(bs['mlp'], bd.mlp)] = 0  # removed hidden channels feed nothing
            if not bd.heads:
                continue
            a, P = blk.token_mixer, 2 * bd.qk + bd.v
            for h in range(bd.heads):
                if h not in bs['heads']:
                    a.proj.weight[:, h * bd.v:(h + 1) * bd.v] = 0
                    continue
                j = bs['heads'].index(h)
                gone_qk, gone_v = keep(bs['qk'][j], bd.qk), keep(bs['v'][j], bd.v)
                for off in (0, bd.qk):  # q and k rows of the removed pairs
                    a.qkv.weight[h * P + off + gone_qk] = 0
                    a.qkv.bias[h * P + off + gone_qk] = 0
                a.proj.weight[:, h * bd.v + gone_v] = 0
        for s, kept in enumerate(sel['stages'][:-1]):  # Meta4D stages: zero every reader of a removed channel
            gone = keep(kept, dims.stages[s])
            for b in twin.stages[s].blocks:
                b.mlp.fc1.weight[:, gone] = 0
            twin.stages[s + 1].downsample.conv.weight[:, gone] = 0
    return twin


@pytest.mark.parametrize('criteria', [{}, {'head_criterion': 'snp', 'v_criterion': 'activation',
                                          'mlp_criterion': 'activation'}])
def test_slice_equals_mask(model, calib, criteria):
    ratios = dict(RATIOS, embed=[.25, .5, .25, 0.])  # the last stage's width has no masked twin (LayerNorm)
    pruned, _ = snp_fast.prune(model, calib, ratios, refit=False, **criteria)
    assert [len(s) for s in pruned.snp_recipe['selection']['stages']] == [6, 8, 18, 32]
    twin = _masked_twin(model, pruned.snp_recipe)
    y_twin, y = _run(twin, calib), _run(pruned, calib)
    assert not torch.allclose(y_twin, _run(model, calib), atol=1e-3)  # the mask did change the model
    torch.testing.assert_close(y, y_twin, atol=1e-5, rtol=1e-4)


def test_attention_keeps_scale_and_slices_biases(model, calib):
    pruned, report = snp_fast.prune(model, calib, RATIOS, refit=False)
    name = next(b.name for b in report.dims_before.blocks if b.heads)
    a0, a1 = model.get_submodule(name).token_mixer, pruned.get_submodule(name).token_mixer
    bs = pruned.snp_recipe['selection']['blocks'][-1]
    assert (a1.num_heads, a1.key_dim, a1.val_dim) == (6, 16, 64) and len(bs['heads']) == 6
    assert a1.scale == a0.scale == 32 ** -0.5  # the ORIGINAL scale, not 1/sqrt(16)
    assert torch.equal(a1.attention_biases, a0.attention_biases[bs['heads']])
    assert tuple(a1.qkv.weight.shape) == (6 * (2 * 16 + 64), 24) and tuple(a1.proj.weight.shape) == (24, 6 * 64)


def test_refit_lowers_output_error(model, calib, held_out):
    y0 = _run(model, held_out)
    err = {}
    for refit in (False, True):
        pruned, report = snp_fast.prune(model, calib, RATIOS, refit=refit)
        err[refit] = ((_run(pruned, held_out) - y0).norm() / y0.norm()).item()
    assert err[True] < 0.5 * err[False], err
    assert all(s.err_refit <= s.err_sliced for s in report.refit.values())
    assert {'stages.1.downsample.conv', 'stages.3.blocks.2.token_mixer.qkv', 'stages.0.blocks.0.mlp.fc1',
            'head', 'head_dist'} <= set(report.refit)


def test_save_load_round_trip(model, calib, tmp_path):
    pruned, report = snp_fast.prune(model, calib, dict(RATIOS, embed=[.25, .5, 0., .25]))
    snp_fast.save_pruned(pruned, str(tmp_path / 'm'), report=report)
    loaded = snp_fast.load_pruned(str(tmp_path / 'm'))
    assert type(loaded) is type(model)
    assert torch.equal(_run(loaded, calib), _run(pruned, calib))
    assert loaded.snp_recipe['dims_after'] == report.dims_after.to_dict()


def test_pruned_model_trains(model, calib):
    pruned, _ = snp_fast.prune(model, calib[:2], RATIOS, refit=False)
    pruned.train()
    out = pruned(calib[:2])
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.parameters())


def test_magnitude_criteria_without_data(model, calib):
    pruned, report = snp_fast.prune(model, None, {'qk': .5, 'v': .5, 'mlp': .5, 'embed': .25}, refit=False,
                                    qk_criterion='magnitude', embed_criterion='magnitude')
    assert report.macs_after < report.macs_before
    assert _run(pruned, calib).shape == (4, 10)


@pytest.mark.parametrize('ratios, match', [
    (1.0, r'outside \[0, 1\)'),
    ({'qk': .5, 'width': .5}, 'unknown keys'),
    ({'embed': [.1, .1]}, '2 stage ratios but the model has 4 stages'),
    ({'blocks': [{'qk': .5}] * 5}, 'pooling block'),
    ({'blocks': [{'mlp': .5}] * 3}, 'one dict per MetaBlock'),
    ('deit_tiny_patch16_224', 'not an EfficientFormer'),
])
def test_bad_ratios_are_refused(model, calib, ratios, match):
    with pytest.raises(ValueError, match=match):
        snp_fast.prune(model, calib, ratios)


def test_bad_inputs_are_refused(model, calib):
    with pytest.raises(ValueError, match='refit="oneshot" is available for the ViT family only'):
        snp_fast.prune(model, calib, .25, refit='oneshot')
    with pytest.raises(ValueError, match='token grid'):
        snp_fast.prune(model, torch.randn(2, 3, 128, 128), .25)
    with pytest.raises(ValueError, match='embed_criterion="activation" is not supported'):
        snp_fast.prune(model, calib, .25, embed_criterion='activation')
    with pytest.raises(ValueError, match='calibration images are needed'):
        snp_fast.prune(model, None, .25)
    pruned, _ = snp_fast.prune(model, calib[:1], .25, refit=False)
    with pytest.raises(snp_fast.UnsupportedModelError, match='already pruned'):
        snp_fast.prune(pruned, calib[:1], .25)


def test_efficientformer_v2_is_refused_with_a_reason():
    model = timm.create_model('efficientformerv2_s0', pretrained=False, device='meta')
    with pytest.raises(snp_fast.UnsupportedModelError, match='EfficientFormerV2 .* different architecture'):
        snp_fast.prune(model, None, .25, refit=False, qk_criterion='magnitude')


@pytest.mark.parametrize('preset, gmacs', [('efficientformer_l1_0p6G', .6), ('efficientformer_l1_0p5G', .5)])
def test_presets_hit_their_macs(preset, gmacs):
    model = timm.create_model('efficientformer_l1', pretrained=False, device='meta')
    dims = ef.model_dims(model)
    after = ef.target_dims(dims, ef.resolve_ratios(preset, dims), [])
    macs = count_macs(ef.apply_dims(meta_copy(model), after))
    assert abs(macs / 1e9 - gmacs) <= .02 * gmacs, macs
    assert snp_fast.load_preset(preset)['model'] == 'efficientformer_l1'
    assert ef.preset_mismatch(preset, dims) is None


def test_a_preset_on_another_variant_warns_that_its_macs_do_not_apply(calib):
    l7 = ef.model_dims(timm.create_model('efficientformer_l7', pretrained=False, device='meta'))
    assert 'efficientformer_l1' in ef.preset_mismatch('efficientformer_l1_0p6G', l7)
    with pytest.warns(UserWarning, match='chosen for efficientformer_l1.*the MACs the preset quotes do not'):
        _, report = snp_fast.prune(tiny_efficientformer(), calib[:2], preset='efficientformer_l1_0p6G', refit=False)
    assert any('chosen for efficientformer_l1' in n for n in report.notes)


def test_ratios_or_a_preset_not_both(calib):
    with pytest.raises(ValueError, match='exactly one of ratios= or preset='):
        snp_fast.prune(tiny_efficientformer(), calib[:2], 0.0, preset='efficientformer_l1_0p6G')


def test_prune_keeps_each_modules_training_flag(calib):
    """A training model with a frozen BatchNorm: the original keeps that module in eval mode and the pruned
    model copies every module's flag (before, model.train(True) on exit unfroze it, in both)."""
    m = tiny_efficientformer()
    m.train()
    m.stem.norm1.eval()
    pruned, _ = snp_fast.prune(m, calib, 0.3)
    assert m.training and not m.stem.norm1.training
    assert pruned.training and not pruned.stem.norm1.training
    assert {n: x.training for n, x in pruned.named_modules()} == {n: x.training for n, x in m.named_modules()}


def test_head_refit_token_budget_without_pooling(calib):
    """global_pool='': the head reads (B, N, C) tokens; the budget counts tokens, not images."""
    m = tiny_efficientformer()
    m.reset_classifier(10, global_pool='')
    ratios = {'qk': 0, 'v': 0, 'mlp': 0, 'embed': [0, 0, 0, .5]}
    n_tokens = calib.shape[0] * 7 * 7
    for budget, used in ((None, n_tokens), (5, 5), (100, 100)):
        _, report = snp_fast.prune(m, calib, ratios, refit_tokens=budget)
        assert report.refit['head'].tokens == used, budget


def test_per_block_ratios_must_be_dicts(calib):
    with pytest.raises(ValueError, match=r'blocks\[0\] must be a dict'):
        snp_fast.prune(tiny_efficientformer(), calib, {'blocks': [0.5] * 5})


def test_no_eval_cache_outlives_prune(calib):
    # timm's EfficientFormer attention caches its bias table on an eval forward and clears it only in train(True);
    # prune() runs both models in eval mode and restores their flags, so a cache it left would survive a later
    # change of the biases (training the original, loading weights into the pruned model)
    m = tiny_efficientformer().train()
    pruned, _ = snp_fast.prune(m, calib[:2], {'qk': .5, 'embed': .25})
    for model in (m, pruned):
        attns = [a for a in model.modules() if isinstance(a, timm.models.efficientformer.Attention)]
        assert attns and all(not a.attention_bias_cache for a in attns)
    with torch.no_grad():  # e.g. a training step of the original, then evaluation
        for a in (a for a in m.modules() if isinstance(a, timm.models.efficientformer.Attention)):
            a.attention_biases.normal_()
    m.eval()
    fresh = tiny_efficientformer().eval()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(_run(m, calib[:1]), _run(fresh, calib[:1]))
