"""SNP on timm Swin Transformer (V1): ratio 0, slice == mask with shifted windows, re-fit, stage widths,
save/load, ONNX, errors (swinv2 refused, presets refused), and the trained digits fixture's accuracy.

A tiny swin (32x32 input, patch 4 -> an 8x8 grid, window 4: stage 0 has four windows and a shifted block,
stage 1 one window; widths 16/32, 2 and 4 heads of 8 dims) keeps these fast."""
import pytest
import timm
import torch

import snp_fast
from snp_fast.families import family_of, swin
from snp_fast.families.base import UnsupportedModelError
from snp_fast.io import load_pruned, save_pruned
from snp_fast.macs import count_macs

RATIOS = {'qk': .5, 'v': .5, 'mlp': .5, 'heads': .25, 'embed': .25}


def tiny_swin(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, **{
        'img_size': 32, 'embed_dim': 16, 'depths': (2, 2), 'num_heads': (2, 4), 'window_size': 4, 'num_classes': 10,
        **kw}).eval()
    with torch.no_grad():  # timm's init (std .02 Linears, bias table ~0) makes the attention nearly uniform
        for n, p in m.named_parameters():
            if 'relative_position_bias_table' in n:
                p.normal_()
            elif p.dim() == 2:
                p.normal_(0, p.shape[1] ** -.5)
            elif n.endswith('norm1.weight') or n.endswith('norm2.weight'):
                p.uniform_(.5, 1.5)
    return m


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def model():
    return tiny_swin()


def _run(m, x):
    with torch.no_grad():
        return m(x)


def test_the_family_and_its_widths(model):
    assert family_of(model).name == 'swin'
    d = swin.model_dims(model)
    assert d.stages == [16, 32]
    assert [(b.name, b.stage, b.heads, b.qk, b.v, b.mlp) for b in d.blocks] == [
        ('layers.0.blocks.0', 0, 2, 8, 8, 64), ('layers.0.blocks.1', 0, 2, 8, 8, 64),
        ('layers.1.blocks.0', 1, 4, 8, 8, 128), ('layers.1.blocks.1', 1, 4, 8, 8, 128)]
    assert any(model.layers[0].blocks[1].shift_size)  # the shifted-window path is exercised


def test_pruned_attention_keeps_the_original_scale_and_the_whole_bias_table(model):
    pruned, _ = snp_fast.prune(model, images(4, 1), RATIOS, refit=False)
    for (name, _, ob), (_, _, pb) in zip(swin.swin_blocks(model), swin.swin_blocks(pruned)):
        assert isinstance(pb.attn, swin.PrunedWindowAttention), name
        assert pb.attn.scale == ob.attn.scale == 8 ** -.5
        assert pb.attn.qk_dim == 4 and pb.attn.v_dim == 4
        assert pb.attn.relative_position_bias_table.shape == (49, pb.attn.num_heads)
    sel = swin.SwinSelection.from_dict(pruned.snp_recipe['selection'])
    b = sel.blocks[2]
    torch.testing.assert_close(pruned.layers[1].blocks[0].attn.relative_position_bias_table,
                               model.layers[1].blocks[0].attn.relative_position_bias_table[:, b.heads])
    # PatchMerging reads stage 0's kept channels once per 2x2 neighbour
    red = pruned.layers[1].downsample.reduction
    assert red.weight.shape == (24, 4 * 12)
    cols = swin.merged_cols(sel.stages[0], 16)
    torch.testing.assert_close(red.weight, model.layers[1].downsample.reduction.weight[sel.stages[1]][:, cols])


def test_refit_helps_on_held_out_images(model):
    # (random weights: with 32 images the classifier's re-fit interpolates them and held-out images gain nothing;
    # 128 images make it a fit)
    calib, held = images(128, 1), images(64, 2)
    ref = _run(model, held)
    errs = {}
    for refit in (False, True):
        pruned, report = snp_fast.prune(model, calib, RATIOS, refit=refit)
        errs[refit] = ((_run(pruned, held) - ref).pow(2).sum() / ref.pow(2).sum()).item()
        if refit:
            assert all(s.err_refit <= s.err_sliced for s in report.refit.values())
            assert 'layers.1.downsample.reduction' in report.refit and 'head.fc' in report.refit
    assert errs[True] < 0.7 * errs[False], errs


def test_qk_selection_follows_snp_scores_per_window(model):
    """The q/k pairs kept are the top ones of ops.qk_scores over the block's windows (q, k as (windows, H, N, d))."""
    calib = images(4, 1)
    pruned, _ = snp_fast.prune(model, calib, {'qk': .5}, refit=False)
    sel = swin.SwinSelection.from_dict(pruned.snp_recipe['selection'])
    blk = model.layers[0].blocks[1]
    cap = {}
    h = blk.attn.qkv.register_forward_hook(lambda m, i, o: cap.setdefault('qkv', o))
    with torch.no_grad():
        model.layers[0](model.patch_embed(calib))
    h.remove()
    qkv = cap['qkv']
    assert qkv.shape[:2] == (4 * 4, 16)  # 4 images x 4 windows, 16 tokens each
    q, k, _ = qkv.view(16, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want = snp_fast.ops.qk_scores(q, k, 4).topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(sel.blocks[1].qk, want)


def test_stage_ratios_per_stage_and_per_block(model):
    pruned, report = snp_fast.prune(model, images(4, 1), {'embed': [0, .5], 'blocks': [
        {'mlp': .5}, {'qk': .25}, {'v': .5, 'heads': .5}, {}]}, refit=False)
    d = report.dims_after
    assert d.stages == [16, 16]
    assert [(b.heads, b.qk, b.v, b.mlp) for b in d.blocks] == [(2, 8, 8, 32), (2, 6, 8, 64), (2, 8, 4, 128),
                                                               (4, 8, 8, 128)]
    assert count_macs(pruned) == report.macs_after < report.macs_before


def test_other_criteria_run_and_keep_the_widths(model):
    """magnitude q/k, activation v / FFN, output-share heads, magnitude stage widths: the same widths as SNP's."""
    calib = images(4, 1)
    want = snp_fast.prune(model, calib, RATIOS, refit=False)[1].dims_after
    _, report = snp_fast.prune(model, calib, RATIOS, refit=False, qk_criterion='magnitude', v_criterion='activation',
                               mlp_criterion='activation', head_criterion='output', embed_criterion='magnitude')
    assert report.dims_after == want
    with pytest.raises(ValueError, match='embed_criterion="activation" is not supported for Swin'):
        snp_fast.prune(model, calib, RATIOS, embed_criterion='activation')


def test_save_load_inspect_and_onnx(model, tmp_path):
    pruned, report = snp_fast.prune(model, images(4, 1), RATIOS)
    save_pruned(pruned, str(tmp_path / 'm'), report=report)
    loaded = load_pruned(str(tmp_path / 'm'))
    x = images(2, 3)
    assert torch.equal(_run(pruned, x), _run(loaded, x))
    assert 'stage widths [16, 32] -> [12, 24]' in report.summary()
    pytest.importorskip('onnxruntime')
    from snp_fast.export import check_onnx, export_onnx
    path = export_onnx(loaded, str(tmp_path / 'm.onnx'))
    assert check_onnx(loaded, path) < 1e-4


def test_a_non_divisible_grid_is_padded_into_windows():
    """A 40x40 image gives a 10x10 grid, padded to 12x12 windows of 4 in stage 0 (and 5x5 -> 8x8 in stage 1): the
    re-fit pairs windows (more tokens than pixels) and the result still matches its own masked-free slice."""
    m = tiny_swin(img_size=40)
    calib = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    pruned, report = snp_fast.prune(m, calib, RATIOS)
    assert all(s.err_refit <= s.err_sliced for s in report.refit.values())
    assert torch.isfinite(_run(pruned, calib)).all()


def test_errors_are_clear(model):
    v2 = timm.create_model('swinv2_tiny_window8_256', pretrained=False, img_size=32, embed_dim=16, depths=(1, 1),
                           num_heads=(2, 4), window_size=4, num_classes=10)
    with pytest.raises(UnsupportedModelError, match='swinv2.*cosine attention'):
        snp_fast.prune(v2, images(2, 1), .5)
    with pytest.raises(ValueError, match='preset of another model family.*no Swin presets'):
        snp_fast.prune(model, images(2, 1), preset='deit_small_patch16_224')
    with pytest.raises(ValueError, match='no Swin presets'):
        snp_fast.prune(model, images(2, 1), 'efficientformer_l1_0p6G')
    with pytest.raises(ValueError, match='gives 3 stage ratios but the model has 2 stages'):
        snp_fast.prune(model, images(2, 1), {'embed': [.5, .5, .5]})
    with pytest.raises(ValueError, match='drop_attn / drop_mlp are ViT-only'):
        snp_fast.prune(model, images(2, 1), {'drop_mlp': 1})
    with pytest.raises(ValueError, match='oneshot'):
        snp_fast.prune(model, images(2, 1), .5, refit='oneshot')
    with pytest.raises(ValueError, match=r'calib images are \(16, 16\) but the model takes \(32, 32\)'):
        snp_fast.prune(model, torch.randn(2, 3, 16, 16), .5)
    pruned, _ = snp_fast.prune(model, images(2, 1), .25, refit=False)
    with pytest.raises(UnsupportedModelError, match='already pruned'):
        snp_fast.prune(pruned, images(2, 1), .25)


@pytest.mark.xfail(strict=True, reason='issue 19 target not met on the digits Swin: 96.0 -> 94.4 % (-1.6 points, one '
                   'image past the 1.5-point bound); strict: a change that meets it fails here until this mark goes')
def test_trained_digits_swin_loses_at_most_1p5_points_at_half_of_every_width():
    """The Swin trained here on real digits (committed fixture, tests/make_swin_digits_checkpoint.py): removing 50 %
    of q/k, v, fc1 AND both stage widths, then the re-fit from 256 training images, loses at most 1.5 points of
    top-1 on the 500 held-out digits, while slicing alone loses far more.

    Measured when the fixture was committed: 96.0 % unpruned, 94.4 % with the re-fit (-1.6 points: 8 of 500 images,
    one more than the 1.5-point bound allows, so this test FAILS; left as the issue states it, for the lead to
    decide), 15.8 % without. Same setting with 64 / 512 calibration images: 91.8 % / 94.6 %."""
    from snp_fast.demo import accuracy, digits_data, load_digits_swin
    model = load_digits_swin()
    x_tr, _, x_te, y_te = digits_data()
    base = accuracy(model, x_te, y_te)
    assert base >= 0.95
    pruned, report = snp_fast.prune(model, x_tr[:256], ratios=0.5)
    assert report.dims_after.stages == [16, 32] and report.macs_after < 0.3 * report.macs_before
    acc = accuracy(pruned, x_te, y_te)
    sliced, _ = snp_fast.prune(model, x_tr[:256], ratios=0.5, refit=False)
    acc_sliced = accuracy(sliced, x_te, y_te)
    assert acc >= base - 0.015, (base, acc)
    assert acc_sliced <= base - 0.1, (base, acc_sliced)
