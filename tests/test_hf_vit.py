"""Hugging Face transformers vision encoders (families/hf_vit): every supported class prunes into a smaller model
that is still the same transformers class, called as before; the re-fit recovers it; save / load are exact and
never reach the network; what is not supported is refused by name. Models are built from small configs (no
download); the trained fixture is the shipped digits ViT carried over into transformers (tests/hf_fixture.py)."""
import socket

import pytest
import torch

import snp_fast
from snp_fast.io import RecipeError, load_pruned, save_pruned

from hf_fixture import digits_hf_vit

transformers = pytest.importorskip('transformers')
SMALL = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
RATIOS = {'qk': .5, 'v': .5, 'mlp': .5, 'heads': .25, 'embed': .25}
CLASSES = {
    'ViTForImageClassification': ('ViTConfig', dict(intermediate_size=128, num_labels=10)),
    'ViTModel': ('ViTConfig', dict(intermediate_size=128)),
    'DeiTForImageClassification': ('DeiTConfig', dict(intermediate_size=128, num_labels=10)),
    'DeiTForImageClassificationWithTeacher': ('DeiTConfig', dict(intermediate_size=128, num_labels=10)),
    'Dinov2Model': ('Dinov2Config', dict(mlp_ratio=2)),
    'Dinov2ForImageClassification': ('Dinov2Config', dict(mlp_ratio=2, num_labels=10)),
}


def build(name: str, **extra):
    config_name, kw = CLASSES[name]
    config = getattr(transformers, config_name)(**SMALL, **kw, **extra)
    torch.manual_seed(0)
    m = getattr(transformers, name)(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def outputs(m, x):
    with torch.no_grad():
        out = m(pixel_values=x)
    return out.logits if hasattr(out, 'logits') else out.last_hidden_state[:, 0]


def features(m, x):
    """The final (normed) hidden states of every token."""
    from snp_fast.families.hf_vit.structure import backbone_name
    with torch.no_grad():
        return m.get_submodule(backbone_name(m))(pixel_values=x).last_hidden_state


@pytest.mark.parametrize('name', sorted(CLASSES))
def test_every_class_prunes_into_the_same_class_and_the_refit_recovers_it(name, tmp_path):
    m = build(name)
    calib, held = images(48, 1), images(16, 2)
    pruned, report = snp_fast.prune(m, calib, RATIOS)
    plain, _ = snp_fast.prune(m, calib, RATIOS, refit=False)
    assert type(pruned) is type(m) and pruned.snp_recipe['family'] == 'hf_vit'
    assert report.dims_after.embed == 48 and all(b.heads == 3 and b.qk == 8 for b in report.dims_after.blocks)
    assert report.params_after < 0.55 * report.params_before
    # held-out images: the re-fit (on other images) brings the final features closer to the original's, as for
    # timm's families (tests/test_families.py; 48 images barely over-determine a re-fitted classifier)
    keep = torch.tensor(pruned.snp_recipe['selection']['embed'])
    f0, f, fn = features(m, held)[..., keep], features(pruned, held), features(plain, held)
    assert (f - f0).pow(2).mean() < 0.8 * (fn - f0).pow(2).mean()
    # classifiers keep their classes; a bare encoder's features are the kept channels (as timm's num_classes=0)
    width = len(keep) if name.endswith('Model') else outputs(m, held).shape[1]
    assert outputs(pruned, held).shape == (16, width)
    save_pruned(pruned, str(tmp_path / 'm'))
    loaded = load_pruned(str(tmp_path / 'm'))
    assert type(loaded) is type(m)
    assert torch.equal(outputs(loaded, held), outputs(pruned, held))


def test_the_trained_digits_fixture_keeps_its_accuracy_at_half_of_every_width():
    from snp_fast.demo import digits_data
    x_tr, _, x_te, y_te = digits_data()
    model = digits_hf_vit()
    top1 = lambda m: (outputs(m, x_te).argmax(1) == y_te).float().mean().item()  # noqa: E731
    pruned, report = snp_fast.prune(model, x_tr[:64], 0.5)
    before, after = top1(model), top1(pruned)
    assert before > 0.95
    assert after >= before - 0.015, (before, after)
    assert report.macs_after < 0.3 * report.macs_before


@pytest.mark.parametrize('case', ['swiglu', 'preset', 'drop', 'timm_name', 'pruned'])
def test_what_is_not_supported_is_refused_by_name(case):
    if case == 'swiglu':
        with pytest.raises(snp_fast.UnsupportedModelError, match='use_swiglu_ffn'):
            snp_fast.prune(build('Dinov2Model', use_swiglu_ffn=True), images(4, 1), 0.5)
        return
    m = build('ViTForImageClassification')
    if case == 'preset':
        with pytest.raises(ValueError, match="preset 'deit_small_patch16_224' is for timm models"):
            snp_fast.prune(m, images(4, 1), preset='deit_small_patch16_224')
    elif case == 'drop':
        with pytest.raises(ValueError, match='drop_attn / drop_mlp'):
            snp_fast.prune(m, images(4, 1), {'drop_attn': [0]})
    elif case == 'timm_name':
        with pytest.raises(ValueError, match='rebuilt from its own config'):
            snp_fast.prune(m, images(4, 1), 0.5, timm_name='vit_tiny_patch16_224')
    else:
        pruned, _ = snp_fast.prune(m, images(4, 1), 0.5)
        with pytest.raises(snp_fast.UnsupportedModelError, match='already pruned'):
            snp_fast.prune(pruned, images(4, 1), 0.5)


def test_a_recipe_builds_only_the_supported_classes_and_never_reaches_the_network(tmp_path, monkeypatch):
    pruned, _ = snp_fast.prune(build('DeiTForImageClassificationWithTeacher'), images(8, 1), RATIOS)
    save_pruned(pruned, str(tmp_path / 'ok'))

    def no_network(*args, **kwargs):
        raise AssertionError('loading a recipe opened a network connection')
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    loaded = load_pruned(str(tmp_path / 'ok'))
    assert torch.equal(outputs(loaded, images(2, 3)), outputs(pruned, images(2, 3)))

    pruned.snp_recipe = dict(pruned.snp_recipe, hf_class='AutoModel')
    save_pruned(pruned, str(tmp_path / 'bad'))
    with pytest.raises(RecipeError, match="transformers class 'AutoModel'"):
        load_pruned(str(tmp_path / 'bad'))


def test_the_command_line_prunes_a_save_pretrained_folder_and_evaluates_it(tmp_path):
    """`snp-fast prune HF_DIR --ratios ...`: read offline, calibrated with the folder's image processor settings,
    saved; `snp-fast eval` on the result uses those settings; what only timm models take is refused."""
    import json
    import numpy as np
    from PIL import Image
    from snp_fast.cli import main
    m = build('ViTForImageClassification')
    m.config.architectures = ['ViTForImageClassification']
    m.save_pretrained(str(tmp_path / 'hf'))
    transformers.ViTImageProcessor(size={'height': 32, 'width': 32}, image_mean=[.4, .4, .4],
                                   image_std=[.3, .3, .3]).save_pretrained(str(tmp_path / 'hf'))
    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / 'val' / f'c{c}').mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / 'val' / f'c{c}' / 'a.png')
    ratios = json.dumps(RATIOS)
    assert main(['prune', str(tmp_path / 'hf'), '--ratios', ratios, '--calib', str(tmp_path / 'val'),
                 '--num-calib', '8', '--out', str(tmp_path / 'out'), '--quiet']) == 0
    pruned = load_pruned(str(tmp_path / 'out'))
    assert type(pruned).__name__ == 'ViTForImageClassification'
    cfg = pruned.snp_recipe['data_config']
    assert cfg['input_size'] == [3, 32, 32] and cfg['mean'] == [.4, .4, .4] and cfg['std'] == [.3, .3, .3]
    assert main(['eval', str(tmp_path / 'out'), '--data', str(tmp_path / 'val'), '-j', '0', '--no-progress',
                 '--json', str(tmp_path / 'e.json')]) == 0
    assert json.loads((tmp_path / 'e.json').read_text())['images'] == 10
    assert main(['prune', str(tmp_path / 'hf'), '--preset', 'deit_small_patch16_224', '--out',
                 str(tmp_path / 'out2')]) == 2
    assert not (tmp_path / 'out2').exists()
