"""Reconstruction-aware selection (snp_fast.criteria): the structured OBS error against a brute-force re-fit,
the greedy removal against brute-force subsets and the magnitude pick, determinism, and prune(criteria=...)."""
import itertools

import pytest
import torch

import snp_fast
from snp_fast.criteria import Reconstruction, consumer_gram, greedy_removal, obs_error
from snp_fast.criteria.reconstruction import damped_gram, greedy_pairs, joint_greedy_removal, logit_gram


@pytest.fixture(autouse=True)
def _one_thread():
    # the greedy loops are many small ops: on a shared, loaded CPU a second thread only adds contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layer(out=5, n=7, tokens=40, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    if correlated:  # shared directions: what one column loses, another can partly carry
        x = x + 0.8 * x[:, :1] @ torch.randn(1, n, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(out, n, generator=g, dtype=torch.float64)
    b = torch.randn(out, 1, generator=g, dtype=torch.float64)
    return x, torch.cat([w, b], dim=1)


def brute_error(x, wb, removed, damp):
    """Solve the damped least squares after removing `removed` directly (as the re-fit does: ridge towards the
    original weights, the bias kept), and return its objective ‖X(W' − W)ᵀ‖² + λ‖W' − W‖² with W'_S = 0."""
    xb = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    n = xb.shape[1]
    lam = damp * float((xb * xb).sum(0).mean())
    keep = [j for j in range(n) if j not in set(removed)]
    y = xb @ wb.t()
    xk = xb[:, keep]
    # min ‖xk Wkᵀ − y‖² + λ‖Wk − W_K‖²  (the removed columns' weights are 0, which costs λ‖W_S‖²)
    wk = torch.linalg.solve(xk.t() @ xk + lam * torch.eye(len(keep), dtype=x.dtype),
                            xk.t() @ y + lam * wb[:, keep].t()).t()
    w_new = torch.zeros_like(wb)
    w_new[:, keep] = wk
    return float((xb @ (w_new - wb).t()).pow(2).sum() + lam * (w_new - wb).pow(2).sum())


@pytest.mark.parametrize('damp', [1e-4, 1e-1])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_obs_error_equals_a_brute_force_refit(seed, damp):
    x, wb = _layer(seed=seed)
    g = consumer_gram(x)
    for size in (1, 2, 4):
        for removed in itertools.islice(itertools.combinations(range(7), size), 12):
            want = brute_error(x, wb, removed, damp)
            got = obs_error(wb, g, removed, damp)
            assert got == pytest.approx(want, rel=1e-8, abs=1e-9), (removed, got, want)


def test_the_greedy_step_costs_sum_to_the_obs_error_of_the_removed_set():
    x, wb = _layer(out=4, n=9, seed=3)
    g = consumer_gram(x)
    for block in (1, 2, 3):
        order, costs = greedy_removal(wb, g, range(9), 6, damp=1e-3, block=block)
        assert len(set(order.tolist())) == 6 and all(0 <= j < 9 for j in order.tolist())
        assert float(costs.sum()) == pytest.approx(obs_error(wb, g, order.tolist(), 1e-3), rel=1e-8)


def _best(x, wb, n, k, damp):
    return min(brute_error(x, wb, s, damp) for s in itertools.combinations(range(n), k))


@pytest.mark.parametrize('seed', range(6))
def test_greedy_is_optimal_for_one_removal_and_never_worse_than_magnitude(seed):
    n, damp = 7, 1e-4
    x, wb = _layer(out=3, n=n, seed=seed)
    g = consumer_gram(x)
    order, _ = greedy_removal(wb, g, range(n), 1, damp=damp)
    assert brute_error(x, wb, order.tolist(), damp) == pytest.approx(_best(x, wb, n, 1, damp), rel=1e-9)
    for k in (2, 3, 4):
        order, _ = greedy_removal(wb, g, range(n), k, damp=damp)
        greedy = brute_error(x, wb, order.tolist(), damp)
        mag = brute_error(x, wb, wb[:, :n].norm(dim=0).argsort()[:k].tolist(), damp)  # the smallest fc2 columns
        assert _best(x, wb, n, k, damp) <= greedy * (1 + 1e-9)
        assert greedy <= mag * (1 + 1e-9)


def test_greedy_removal_honours_forced_columns_and_group_quotas():
    x, wb = _layer(out=4, n=12, seed=4)
    g = consumer_gram(x)
    group_of = torch.arange(12) // 4          # three "heads" of 4 columns
    cand = list(range(4, 12))                 # head 0 removed whole (forced)
    for block in (1, 3):
        order, costs = greedy_removal(wb, g, cand, 4, damp=1e-4, forced=range(4), group_of=group_of,
                                      quota=[0, 2, 2], block=block)
        assert sorted(torch.bincount(group_of[order], minlength=3).tolist()) == [0, 2, 2]
        total = obs_error(wb, g, list(range(4)) + order.tolist(), 1e-4) - obs_error(wb, g, range(4), 1e-4)
        assert float(costs.sum()) == pytest.approx(total, rel=1e-8)


def test_damped_gram_is_the_refit_ridge():
    x, _ = _layer()
    g = consumer_gram(x)
    lam = 1e-2 * float(g.diagonal().mean())
    assert torch.allclose(damped_gram(g, 1e-2) - g, lam * torch.eye(g.shape[0], dtype=g.dtype))


def test_joint_greedy_costs_are_the_weighted_obs_errors_and_one_consumer_is_the_plain_greedy():
    x, wb = _layer(out=4, n=8, seed=5)
    x2, wb2 = _layer(out=6, n=8, seed=6)
    g, g2 = consumer_gram(x), consumer_gram(x2)
    order, costs = joint_greedy_removal([(wb, g, 1.0)], 8, 5, damp=1e-4)
    assert order.tolist() == greedy_removal(wb, g, range(8), 5, damp=1e-4)[0].tolist()
    order, costs = joint_greedy_removal([(wb, g, 0.3), (wb2, g2, 2.0)], 8, 5, damp=1e-4)
    s = order.tolist()
    want = 0.3 * obs_error(wb, g, s, 1e-4) + 2.0 * obs_error(wb2, g2, s, 1e-4)
    assert float(costs.sum()) == pytest.approx(want, rel=1e-8)
    first = min(range(8), key=lambda j: 0.3 * obs_error(wb, g, [j], 1e-4) + 2.0 * obs_error(wb2, g2, [j], 1e-4))
    assert s[0] == first


def _logit_loss(q, k, removed):
    """Σ over images and heads of ‖Σ_{i∈S} q_i k_iᵀ‖²_F, directly from the N×N products."""
    r = list(removed)
    return float(sum((q[b, h][:, r] @ k[b, h][:, r].t()).pow(2).sum()
                     for b in range(q.shape[0]) for h in range(q.shape[1])))


@pytest.mark.parametrize('seed', [7, 8, 9])
def test_logit_gram_gives_the_logit_error_and_greedy_pairs_the_brute_force_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64) + q  # correlated: cross terms matter
    m = logit_gram(q, k)
    for removed in itertools.islice(itertools.combinations(range(6), 3), 10):
        one = torch.zeros(6, dtype=torch.float64)
        one[list(removed)] = 1
        want = _logit_loss(q, k, removed)
        assert float(torch.einsum('i,hij,j->', one, m, one)) == pytest.approx(want, rel=1e-10)
    s = greedy_pairs(m, 4)
    assert s.shape == (2, 6) and ((s < 4).sum(1) == 4).all() and (s[s >= 4] == 6).all()
    for h in range(2):  # each step: the pair whose removal, with those before, leaves the least logit error
        removed = []
        for t in range(4):
            best = min((j for j in range(6) if j not in removed),
                       key=lambda j: _logit_loss(q[:, h:h + 1], k[:, h:h + 1], removed + [j]))
            assert int((s[h] == t).nonzero()) == best
            removed.append(best)


def _digits():
    from snp_fast.demo import digits_data, load_digits_vit
    x_tr = digits_data()[0]
    return load_digits_vit(), x_tr[:16]


def test_prune_with_reconstruction_criteria_on_the_digits_vit():
    model, calib = _digits()
    ratios = {'qk': .5, 'v': .5, 'mlp': .5, 'embed': .25}
    rec, report = snp_fast.prune(model, calib, ratios, criteria='reconstruction')
    snp, snp_report = snp_fast.prune(model, calib, ratios)
    a, b = rec.snp_recipe['selection'], snp.snp_recipe['selection']
    assert report.settings['criteria'] == 'reconstruction' and 'criteria' not in snp_report.settings
    assert a['embed'] != b['embed']
    for ba, bb in zip(a['blocks'], b['blocks']):
        assert ba['mlp'] != bb['mlp'] and ba['v'] != bb['v'] and ba['qk'] != bb['qk']
    # deterministic: the same selection again, and the Selector on its own gives it too
    again, _ = snp_fast.prune(model, calib, ratios, criteria='reconstruction')
    assert again.snp_recipe['selection'] == a
    direct, _ = snp_fast.prune(model, calib, ratios, selection=Reconstruction(calib=calib))
    assert direct.snp_recipe['selection'] == a
    # without images the Selector leaves the stream to the built-in criterion; a given criterion wins
    no_embed, _ = snp_fast.prune(model, calib, ratios, selection=Reconstruction())
    assert no_embed.snp_recipe['selection']['embed'] == b['embed']
    given, _ = snp_fast.prune(model, calib, ratios, criteria='reconstruction', qk_criterion='snp',
                              mlp_criterion='redundancy')
    for bg, ba, bb in zip(given.snp_recipe['selection']['blocks'], a['blocks'], b['blocks']):
        assert bg['qk'] == bb['qk'] and bg['v'] == ba['v']  # (mlp: chosen on another stream, not comparable)
    x = calib[:8]
    with torch.no_grad():
        assert torch.equal(rec(x), again(x)) and torch.isfinite(rec(x)).all()


def test_the_fc1_choice_has_a_lower_obs_error_than_snp_on_the_digits_vit():
    """Block 0's fc2 (its inputs are the original model's in both runs): the kept FFN neurons of the
    reconstruction criterion leave a smaller damped least-squares error than SNP's redundancy choice."""
    model, calib = _digits()
    ratios = {'mlp': .5, 'qk': 0., 'v': 0., 'embed': 0.}
    rec, _ = snp_fast.prune(model, calib, ratios, criteria='reconstruction', refit=False)
    snp, _ = snp_fast.prune(model, calib, ratios, refit=False)
    blk = model.blocks[0]
    h = []
    hook = blk.mlp.fc2.register_forward_hook(lambda m, i, o: h.append(i[0].detach()))
    with torch.no_grad():
        model(calib)
    hook.remove()
    g = consumer_gram(h[0].double())
    w = torch.cat([blk.mlp.fc2.weight, blk.mlp.fc2.bias.unsqueeze(1)], dim=1).double()
    n = blk.mlp.fc2.in_features
    err = lambda kept: obs_error(w, g, sorted(set(range(n)) - set(kept)))  # noqa: E731
    assert err(rec.snp_recipe['selection']['blocks'][0]['mlp']) < err(snp.snp_recipe['selection']['blocks'][0]['mlp'])


def test_the_criteria_switch():
    model, calib = _digits()
    mag, rep = snp_fast.prune(model, None, 0.3, criteria='magnitude', refit=False)
    ref, _ = snp_fast.prune(model, None, 0.3, refit=False, qk_criterion='magnitude', v_criterion='magnitude',
                            mlp_criterion='magnitude', embed_criterion='magnitude')
    assert mag.snp_recipe['selection'] == ref.snp_recipe['selection'] and rep.settings['criteria'] == 'magnitude'
    # a per-group argument still decides its group
    mixed, _ = snp_fast.prune(model, None, 0.3, criteria='magnitude', refit=False, embed_criterion='redundancy')
    snp_embed, _ = snp_fast.prune(model, calib, 0.3, refit=False)
    assert mixed.snp_recipe['selection']['embed'] == snp_embed.snp_recipe['selection']['embed']
    with pytest.raises(ValueError, match='criteria='):
        snp_fast.prune(model, calib, 0.3, criteria='obs')
    with pytest.raises(ValueError, match='selection='):
        snp_fast.prune(model, calib, 0.3, criteria='reconstruction', selection=Reconstruction())
    with pytest.raises(ValueError, match='calibration images'):
        snp_fast.prune(model, None, 0.3, criteria='reconstruction', refit=False, qk_criterion='magnitude')


def test_reconstruction_with_head_pruning_branch_dropping_and_another_family():
    model, calib = _digits()
    ratios = {'heads': .25, 'qk': .5, 'v': .5, 'mlp': .5, 'embed': .25, 'drop_mlp': [1]}
    pruned, _ = snp_fast.prune(model, calib, ratios, criteria='reconstruction')
    base, _ = snp_fast.prune(model, calib, ratios)
    a, b = pruned.snp_recipe['selection']['blocks'], base.snp_recipe['selection']['blocks']
    assert [x['heads'] for x in a] == [x['heads'] for x in b]  # heads: the built-in criterion
    assert a[1]['mlp'] == [] and any(x['v'] != y['v'] for x, y in zip(a, b))
    with torch.no_grad():
        assert torch.isfinite(pruned(calib)).all()
    from test_efficientformer import tiny_efficientformer  # groups of shapes it does not know: the built-in criteria
    ef = tiny_efficientformer()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    got, _ = snp_fast.prune(ef, x, {'qk': .5, 'mlp': .5}, criteria='reconstruction', refit=False)
    with torch.no_grad():
        assert torch.isfinite(got(x)).all()
