"""The selection hook: prune(selection=<Selector>) decides the groups it answers for, through the same slicing
and re-fit; bad answers are refused by name; a Selector sees what it asked to capture."""
import pytest
import timm
import torch

import snp_fast
from snp_fast.families import vit
from snp_fast.scores import select_per_head, select_top


def _vit():
    torch.manual_seed(0)
    m = timm.create_model('vit_small_patch16_224', pretrained=False, depth=2, img_size=32, patch_size=8,
                          embed_dim=64, num_heads=4, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Reverse(snp_fast.Selector):
    """FFN neurons: keep the LOWEST L1 fc1 rows; value filters: keep the highest row index; the rest: default."""
    captures = ('fc2_in',)

    def __init__(self):
        self.seen = []

    def scores(self, group):
        self.seen.append((group.kind, group.where, group.keep, tuple(group.shape), sorted(group.captured)))
        if group.kind == 'mlp':
            return -group.module.mlp.fc1.weight.abs().sum(1)
        if group.kind == 'v':
            return torch.arange(group.shape[1], dtype=torch.float).expand(group.shape).clone()
        return None


def test_a_selector_decides_its_groups_and_the_criteria_the_rest():
    model, calib = _vit()
    ratios = {'qk': .5, 'v': .5, 'mlp': .5, 'embed': .25}
    sel = Reverse()
    pruned, report = snp_fast.prune(model, calib, ratios=ratios, selection=sel)
    default, _ = snp_fast.prune(model, calib, ratios=ratios)
    kept, base = pruned.snp_recipe['selection'], default.snp_recipe['selection']
    assert report.settings['selection'] == 'Reverse'
    for i, blk in enumerate(model.blocks):
        want_mlp = select_top(-blk.mlp.fc1.weight.abs().sum(1), len(base['blocks'][i]['mlp']))
        assert kept['blocks'][i]['mlp'] == want_mlp.tolist() != base['blocks'][i]['mlp']
        d = blk.attn.head_dim
        assert kept['blocks'][i]['v'] == [list(range(d // 2, d))] * 4
        assert kept['blocks'][i]['qk'] == base['blocks'][i]['qk']  # not answered: the default criterion
    assert kept['embed'] == base['embed']
    kinds = {k for k, *_ in sel.seen}
    assert kinds == {'embed', 'qk', 'v', 'mlp'}
    mlp_seen = [s for s in sel.seen if s[0] == 'mlp']
    assert all('fc2_in' in s[4] and s[3] == (blk.mlp.fc1.out_features,) for s, blk in zip(mlp_seen, model.blocks))
    with torch.no_grad():
        assert torch.isfinite(pruned(calib)).all()


def test_a_selector_on_efficientformer():
    from test_efficientformer import tiny_efficientformer
    model = tiny_efficientformer()
    calib = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    class FirstHeads(snp_fast.Selector):
        def scores(self, group):
            if group.kind == 'heads':
                return -torch.arange(group.shape[0], dtype=torch.float)  # keep the first heads
            return None
    pruned, _ = snp_fast.prune(model, calib, ratios={'heads': .5, 'qk': .5}, selection=FirstHeads(), refit=False)
    attn = [b for b in pruned.snp_recipe['selection']['blocks'] if 'heads' in b]
    assert attn and all(b['heads'] == list(range(len(b['heads']))) for b in attn)


@pytest.mark.parametrize('bad', ['shape', 'ratios'])
def test_bad_selection_input_is_refused_by_name(bad):
    model, calib = _vit()

    class WrongShape(snp_fast.Selector):
        def scores(self, group):
            return torch.zeros(3) if group.kind == 'mlp' else None
    if bad == 'shape':
        with pytest.raises(ValueError, match=r'WrongShape.scores gave shape \(3,\) for the mlp group of blocks.0'):
            snp_fast.prune(model, calib, ratios=.5, selection=WrongShape())
    else:
        pruned, _ = snp_fast.prune(model, calib, ratios=.5, refit=False)
        sel = vit.Selection.from_dict(pruned.snp_recipe['selection'])
        with pytest.raises(ValueError, match='give no ratios= or preset='):
            snp_fast.prune(model, calib, ratios=.5, selection=sel)


def test_selected_members_are_the_top_scores_per_head():
    s = torch.tensor([[3., 1., 2.], [0., 5., 4.]])
    assert select_per_head(s, 2).tolist() == [[0, 2], [1, 2]]
