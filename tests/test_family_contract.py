"""The contract every registered model family keeps (parametrised over snp_fast.families.families()):
ratio 0 is the identity, slicing equals masking the removed members in the original, save -> load is
bit-exact, the MACs are those of the widths and shrink with them, and a given selection is replayed exactly.

A new family must add its tiny test model to FIXTURES (test_every_family_has_a_fixture fails until it does)."""
import copy

import pytest
import timm
import torch

import snp_fast
from snp_fast.families import families, family_of
from snp_fast.io import load_pruned, save_pruned
from snp_fast.macs import count_macs, meta_copy

from test_efficientformer import tiny_efficientformer
from test_swin import images as swin_images, tiny_swin


def _vit():
    torch.manual_seed(0)
    m = timm.create_model('vit_small_patch16_224', pretrained=False, depth=3, img_size=32, patch_size=8,
                          embed_dim=64, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, lambda n, seed: torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _efficientformer():
    return tiny_efficientformer(), lambda n, seed: torch.randn(n, 3, 224, 224,
                                                               generator=torch.Generator().manual_seed(seed))


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    m = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=128, num_labels=10)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, lambda n, seed: torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _swin():
    return tiny_swin(), lambda n, seed: swin_images(n, seed)


# family name -> tiny model + image maker; ratios whose removals have an exact masked twin (no stream channels)
FIXTURES = {'vit': _vit, 'efficientformer': _efficientformer, 'hf_vit': _hf_vit, 'swin': _swin}
INNER = {'qk': .5, 'v': .5, 'mlp': .5, 'heads': .25}
NAMES = sorted(f.name for f in families())


def test_every_family_has_a_fixture():
    assert set(FIXTURES) == set(NAMES)


def _run(m, x):
    with torch.no_grad():
        out = m(x)
    return getattr(out, 'logits', out)  # (a transformers model returns an output object)


@pytest.mark.parametrize('name', NAMES)
def test_ratio_zero_is_the_identity(name):
    model, images = FIXTURES[name]()
    x = images(4, 1)
    pruned, report = snp_fast.prune(model, x, ratios=0.0)
    assert family_of(model).name == name and pruned.snp_recipe['family'] == name
    assert report.params_after == report.params_before and report.macs_after == report.macs_before
    torch.testing.assert_close(_run(pruned, images(2, 2)), _run(model, images(2, 2)), rtol=1e-5, atol=1e-6)


def _masked_twin(model: torch.nn.Module, plan: dict) -> torch.nn.Module:
    """The original with every member a plan removes set to zero (weights and biases alike)."""
    twin = copy.deepcopy(model)
    state = twin.state_dict()
    with torch.no_grad():
        for tensor_name, slices in plan.items():
            t = state[tensor_name]
            if not t.is_floating_point():
                continue
            for dim, kept in slices:
                drop = torch.ones(t.shape[dim], dtype=torch.bool)
                drop[kept] = False
                t.index_fill_(dim, drop.nonzero().flatten(), 0.0)
    return twin


@pytest.mark.parametrize('name', NAMES)
def test_slicing_equals_masking(name):
    """q/k, v, FFN and head removals (no stream channels, whose norms have no masked twin) change nothing but
    the removed members' contributions: the sliced model equals the original with those members zeroed."""
    model, images = FIXTURES[name]()
    family = family_of(model)
    pruned, _ = snp_fast.prune(model, images(4, 1), ratios=INNER, refit=False)
    sel = family.selection_type.from_dict(pruned.snp_recipe['selection'])
    twin = _masked_twin(model, family.slice_plan(model, sel))
    x = images(3, 2)
    torch.testing.assert_close(_run(pruned, x), _run(twin, x), rtol=1e-4, atol=1e-5)
    assert snp_fast.count_params(pruned) < snp_fast.count_params(model)


@pytest.mark.parametrize('name', NAMES)
def test_save_load_is_bit_exact(name, tmp_path):
    model, images = FIXTURES[name]()
    pruned, _ = snp_fast.prune(model, images(4, 1), ratios={**INNER, 'embed': .25})
    save_pruned(pruned, str(tmp_path / 'm'))
    loaded = load_pruned(str(tmp_path / 'm'))
    a, b = pruned.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    x = images(2, 3)
    assert torch.equal(_run(pruned.eval(), x), _run(loaded, x))


@pytest.mark.parametrize('name', NAMES)
def test_macs_are_the_widths_and_shrink_with_them(name):
    model, images = FIXTURES[name]()
    family = family_of(model)
    before = family.model_dims(model)
    macs = [count_macs(model)]
    for r in (.25, .5):
        spec = family.resolve_ratios({**INNER, 'qk': r, 'v': r, 'mlp': r, 'embed': r}, before)
        dims = family.target_dims(before, spec, [])
        want = count_macs(family.apply_dims(meta_copy(model), dims))
        pruned, report = snp_fast.prune(model, images(4, 1), ratios={**INNER, 'qk': r, 'v': r, 'mlp': r, 'embed': r},
                                        refit=False)
        assert family.model_dims(pruned) == dims == report.dims_after
        assert count_macs(pruned) == want == report.macs_after
        macs.append(want)
    assert macs[0] > macs[1] > macs[2]


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('refit', [False, True])
def test_a_given_selection_is_replayed_exactly(name, refit):
    """prune(selection=<the Selection prune chose>) takes the same slicing and re-fit: the same model, bit for bit."""
    model, images = FIXTURES[name]()
    family = family_of(model)
    calib = images(4, 1)
    pruned, _ = snp_fast.prune(model, calib, ratios={**INNER, 'embed': .25}, refit=refit)
    sel = family.selection_type.from_dict(pruned.snp_recipe['selection'])
    again, report = snp_fast.prune(model, calib, selection=sel, refit=refit)
    assert again.snp_recipe['selection'] == pruned.snp_recipe['selection']
    assert report.settings['selection'] == 'given' and report.settings['ratios'] is None
    a, b = pruned.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
