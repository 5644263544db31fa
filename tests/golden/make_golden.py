"""Golden results of snp_fast.prune(): the selected indices and a hash of the pruned weights, for a fixed
set of configurations over every family and option. Recorded once (before the pipeline refactor) with

    python tests/golden/make_golden.py        # writes tests/golden/golden.json

and held by tests/test_golden.py: a refactor that changes any selection or any weight bit fails it."""
import hashlib
import json
import os
import sys

import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (the fixtures' builders)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def _digits():
    from snp_fast.demo import digits_data, load_digits_vit
    return load_digits_vit(), digits_data()[0][:48]


def _family(name, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4,
                          num_classes=10, **kw).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if 'gamma' in n else 0.05))
    return m, torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _efficientformer():
    from test_efficientformer import tiny_efficientformer
    return tiny_efficientformer(), torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))


EVERY = {'qk': .5, 'v': .5, 'mlp': .5, 'embed': .25}
HEADS_AND_DROPS = {'qk': .25, 'v': .5, 'mlp': .5, 'heads': .25, 'embed': .25, 'drop_attn': [2], 'drop_mlp': 1}
EF_RATIOS = {'qk': .5, 'v': .5, 'mlp': .5, 'heads': .25, 'embed': .25}

# name -> (model builder, prune() keyword arguments)
CONFIGS = {
    'vit_every_group': (_digits, dict(ratios=EVERY)),
    'vit_oneshot': (_digits, dict(ratios=EVERY, refit='oneshot')),
    'vit_no_refit': (_digits, dict(ratios=EVERY, refit=False)),
    'vit_weights_only': (_digits, dict(ratios=EVERY, refit=False, qk_criterion='magnitude', v_criterion='magnitude',
                                       mlp_criterion='magnitude', embed_criterion='magnitude', calib=None)),
    'vit_activation': (_digits, dict(ratios=EVERY, v_criterion='activation', mlp_criterion='activation',
                                     embed_criterion='activation')),
    'vit_heads_drops': (_digits, dict(ratios=HEADS_AND_DROPS)),
    'vit_heads_output': (_digits, dict(ratios={'heads': .5, 'qk': .25, 'v': .25}, head_criterion='output')),
    'vit_bf16': (_digits, dict(ratios=EVERY, precision='bf16')),
    'vit_refit_tokens': (_digits, dict(ratios=EVERY, refit_tokens=500, gamma=3)),
    'eva_rope': (lambda: _family('vit_small_patch16_dinov3_qkvb'), dict(ratios={'qk': 0, 'v': .5, 'mlp': .5,
                                                                               'embed': .25})),
    'vit_map_pool': (lambda: _family('vit_base_patch16_siglip_224'), dict(ratios=EVERY)),
    'relpos': (lambda: _family('vit_relpos_medium_patch16_cls_224'), dict(ratios={'qk': .5, 'v': .5, 'mlp': .5,
                                                                                 'embed': .25})),
    'efficientformer': (_efficientformer, dict(ratios=EF_RATIOS)),
    'efficientformer_no_refit': (_efficientformer, dict(ratios=EF_RATIOS, refit=False, qk_criterion='magnitude',
                                                        head_criterion='output')),
}


def run(name: str) -> dict:
    import snp_fast
    build, kw = CONFIGS[name]
    model, calib = build()
    kw = dict(kw)
    calib = kw.pop('calib', calib)
    pruned, _ = snp_fast.prune(model, calib, **kw)
    return {'selection': pruned.snp_recipe['selection'], 'dims_after': pruned.snp_recipe['dims_after'],
            'weights': weights_digest(pruned)}


if __name__ == '__main__':
    torch.set_num_threads(2)
    out = {name: run(name) for name in CONFIGS}
    with open(os.path.join(HERE, 'golden.json'), 'w') as f:
        json.dump(out, f, indent=0, sort_keys=True)
    print({k: v['weights'][:12] for k, v in out.items()})
