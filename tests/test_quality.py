"""snp_fast.quality: metrics on hand cases, baselines at exactly the SNP model's dims/MACs, custom-selection
slicing == prune()'s, and the --quick comparison on the shipped digits ViT."""
import math

import pytest
import torch

import snp_fast
from research import quality as Q
from snp_fast.families.vit import Selection, model_dims


@pytest.fixture(scope='module')
def digits():
    return Q._digits(64)


# ------------------------------------------------------------------------------------------------
# metrics on hand cases

def test_identical_maps_give_zero():
    a = torch.rand(3, 2, 5, 5).softmax(-1)
    assert Q.rel_fro(a, a.clone()) == 0.0
    assert Q.attn_kl(a, a.clone()) == pytest.approx(0.0, abs=1e-15)
    logits = torch.randn(7, 10)
    assert Q.logit_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-15)
    # KL of softmax is invariant to a per-row shift of the logits
    assert Q.logit_kl(logits, logits + torch.randn(7, 1)) == pytest.approx(0.0, abs=1e-12)


def test_known_perturbations():
    a = torch.rand(4, 6) + 0.1
    assert Q.rel_fro(a.double(), a.double() * 1.25) == pytest.approx(0.25, rel=1e-12)
    assert Q.rel_fro(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(1 / 5, rel=1e-12)
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + math.log(1 / 0.5)) / 2
    assert Q.attn_kl(p, q) == pytest.approx(want, rel=1e-9)
    # logits [0, 0] vs [0, log 3]: softmax (1/2, 1/2) vs (1/4, 3/4)
    kl = Q.logit_kl(torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64))
    assert kl == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-9)


def test_recorder_reproduces_timm_attention(digits):
    """The maps recomputed from the qkv hook are the model's own attention (checked via the block output)."""
    model, _, x, _ = digits
    attn = model.blocks[0].attn
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x[:4]))))
    n1 = model.blocks[0].norm1(h)
    with torch.no_grad(), Q.AttentionRecorder(model) as rec:
        want = attn(n1)
    a = rec.logits(0).softmax(-1)
    B, N, _ = n1.shape
    v = attn.qkv(n1).view(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    got = attn.proj((a @ v).transpose(1, 2).reshape(B, N, -1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unpruned_model_scores_perfectly(digits):
    model, _, x, y = digits
    ref = Q.Reference(model, x[:100], y[:100])
    q = Q.evaluate(ref, model)
    assert q.agreement == 1.0 and q.logit_kl == 0.0
    assert q.attn_err == [0.0] * len(model.blocks) and q.attn_kl == [0.0] * len(model.blocks)


# ------------------------------------------------------------------------------------------------
# baselines and custom selections

@pytest.mark.parametrize('ratios,refits', [(0.3, (False, True)), (dict(qk=0.5, v=0.5, mlp=0.5, embed=0.0), (False,))])
def test_baselines_have_the_snp_models_dims_and_macs(digits, ratios, refits):
    model, calib, _, _ = digits
    snp, report = snp_fast.prune(model, calib[:16], ratios=ratios, refit=False)
    dims = Q.dims_for(model, ratios)
    assert model_dims(snp) == dims
    for method in ('random', 'l1', 'l2'):
        sel = Q.baseline_selection(model, dims, method, seed=3)
        assert sel.dims() == dims
        for b in sel.blocks:  # sorted, unique, in range
            assert (b.qk.diff(dim=1) > 0).all() and (b.v.diff(dim=1) > 0).all() and (b.mlp.diff() > 0).all()
        for refit in refits:
            pruned = snp_fast.prune(model, calib[:16], selection=sel, refit=refit)[0]
            assert model_dims(pruned) == dims
            assert snp_fast.count_macs(pruned) == report.macs_after
            assert snp_fast.count_params(pruned) == report.params_after
            assert torch.isfinite(pruned(calib[:4])).all()


def test_random_baseline_is_seeded(digits):
    model = digits[0]
    dims = Q.dims_for(model, 0.5)
    a, b, c = (Q.baseline_selection(model, dims, 'random', seed=s).to_dict() for s in (0, 0, 1))
    assert a == b and a != c


def test_l2_baseline_is_prunes_magnitude_criterion(digits):
    model = digits[0]
    p, _ = snp_fast.prune(model, None, ratios=0.4, refit=False, qk_criterion='magnitude', v_criterion='magnitude',
                          mlp_criterion='magnitude', embed_criterion='magnitude')
    assert Q.baseline_selection(model, Q.dims_for(model, 0.4), 'l2').to_dict() == p.snp_recipe['selection']


def test_uniform_ratio_for_macs(digits):
    model = digits[0]
    r, frac = Q.uniform_ratio_for_macs(model, 0.5)
    assert 0 < r < 1 and abs(frac - 0.5) < 0.02


# ------------------------------------------------------------------------------------------------
# the comparison command

def test_quick_comparison_runs(tmp_path):
    out = tmp_path / 'q.md'
    assert Q.main(['--quick', '--out', str(out), '--threads', '1']) == 0
    md = out.read_text()
    for s in ('## digits ViT', 'L1 magnitude + re-fit', 'L2 magnitude', 'random (seed 0)', 'SNP (default) + re-fit',
              '### Targets', 'MACs ≈ 0.5', '### After a short KD recovery'):
        assert s in md
    assert 'nan' not in md.lower()


@pytest.mark.parametrize('n', ['0', str(Q.CALIB_POOL + 1)])
def test_calibration_count_beyond_the_pool_is_refused(n, capsys):
    with pytest.raises(SystemExit) as e:  # before: 1000 asked, 256 used, "1000 training images" printed
        Q.main(['--quick', '--calib', n])
    assert e.value.code == 2 and f'the calibration pool holds {Q.CALIB_POOL}' in capsys.readouterr().err


def test_faces_fixture():
    """The second shipped fixture (tests/make_faces_checkpoint.py): a 6-block, 4-head timm ViT on
    scikit-image's face / non-face subset, with the held-out accuracy recorded in its metadata."""
    import os
    from safetensors import safe_open
    import snp_fast.demo as demo
    model = demo.load_faces_vit()
    _, _, x_te, y_te = demo.faces_data()
    assert len(model.blocks) >= 6 and model.blocks[0].attn.num_heads >= 4
    path = os.path.join(os.path.dirname(demo.__file__), 'data', 'faces_vit.safetensors')
    with safe_open(path, 'pt') as f:
        meta = f.metadata()
    acc = demo.accuracy(model, demo.faces_crop(x_te), y_te)
    assert acc == pytest.approx(float(meta['test_accuracy']), abs=1e-4) and acc >= 0.9
    assert meta['seed'] == '0'
