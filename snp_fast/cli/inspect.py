"""snp-fast inspect: what a directory written by prune holds (architecture, widths, sizes, settings, files)."""
import json
import os

from ._common import EXIT_OK, UsageError, family_name

def _fmt_bytes(n: int) -> str:
    for unit, f in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= f:
            return f'{n / f:.2f} {unit}'
    return f'{n} B'


def _inspect_vit(directory: str, recipe: dict) -> None:
    import timm
    from ..allocate import dims_cost
    from ..io import RecipeError
    from ..models.vit import ModelDims
    try:
        before, after = ModelDims.from_dict(recipe['dims_before']), ModelDims.from_dict(recipe['dims_after'])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f'{directory}/recipe.json: malformed dims: {e}') from None
    name, kw = _inspect_header(directory, recipe)
    try:
        meta = timm.create_model(name, pretrained=False, device='meta', **kw)
        costs = {m: (dims_cost(meta, before, m), dims_cost(meta, after, m)) for m in ('params', 'macs')}
        (p0, p1), (m0, m1) = costs['params'], costs['macs']
        print(f'params {p0 / 1e6:.2f}M -> {p1 / 1e6:.2f}M ({p1 / p0:.1%}),  MACs {m0 / 1e9:.3f}G -> {m1 / 1e9:.3f}G '
              f'({m1 / m0:.1%}),  embed {before.embed} -> {after.embed}')
    except Exception as e:  # noqa: BLE001 -- still print the widths
        print(f'(cannot rebuild {name!r} to count params/MACs: {e})')
    print(f'{"block":>5} {"heads":>5} {"q/k per head":>13} {"v per head":>11} {"fc1":>11}')
    for i, (x, y) in enumerate(zip(before.blocks, after.blocks)):
        print(f'{i:>5} {y.heads:>5} {x.qk:>5} -> {y.qk:<4} {x.v:>4} -> {y.v:<4} {x.mlp:>4} -> {y.mlp:<5}')


def _inspect_efficientformer(directory: str, recipe: dict) -> None:
    import timm
    from ..io import RecipeError
    from ..macs import count_macs, count_params, meta_copy
    from ..models import efficientformer as ef
    try:
        before, after = ef.EfficientFormerDims.from_dict(recipe['dims_before']), \
            ef.EfficientFormerDims.from_dict(recipe['dims_after'])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f'{directory}/recipe.json: malformed dims: {e}') from None
    name, kw = _inspect_header(directory, recipe)
    try:
        meta = timm.create_model(name, pretrained=False, device='meta', **kw)
        small = ef.apply_dims(meta_copy(meta), after)
        sizes = (count_params(meta), count_params(small), count_macs(meta), count_macs(small))
    except Exception as e:  # noqa: BLE001 -- still print the widths
        print(f'(cannot rebuild {name!r} to count params/MACs: {e})')
        sizes = (1, 1, 1, 1)
    print('\n'.join(ef.EfficientFormerReport(before, after, *sizes, times={}, settings={})._size_lines()))


def _inspect_header(directory: str, recipe: dict):
    name, kw = recipe.get('timm_name'), recipe.get('timm_kwargs') or {}
    print(f'{directory}: {name} pruned with snp_fast {recipe.get("snp_fast_version", "?")} ({recipe.get("format")})')
    if kw:
        print('timm kwargs: ' + json.dumps(kw))
    return name, kw


def run(args) -> int:
    from ..io import load_recipe
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    recipe = load_recipe(args.dir)
    if family_name(recipe) == 'efficientformer':
        _inspect_efficientformer(args.dir, recipe)
    else:
        _inspect_vit(args.dir, recipe)
    s = recipe.get('settings') or {}
    keys = ('preset', 'qk_criterion', 'v_criterion', 'mlp_criterion', 'embed_criterion', 'refit', 'calib_images', 'backend',
            'precision')
    print('settings: ' + ', '.join(f'{k}={s[k]}' for k in keys if k in s and not (k == 'preset' and s[k] is None)))
    rpath = os.path.join(args.dir, 'report.json')
    if os.path.isfile(rpath):
        try:
            with open(rpath) as f:
                rep = json.load(f)
            if not isinstance(rep, dict):
                raise ValueError(f'a JSON {type(rep).__name__}, not an object')
            times = rep.get('times') or {}
            print('prune time: ' + ', '.join(f'{k} {v:.2f}s' for k, v in times.items() if v) +
                  f'; total {sum(times.values()):.2f}s')
            cli = rep.get('cli') or {}
            if cli.get('allocation'):
                a = cli['allocation']
                print(f'allocation: {a["metric"]} target {a["target"]:.4g} -> {a["achieved"]:.4g} '
                      f'({a["rel_error"]:+.2%}), scale {a["scale"]:.4f}, round_to {a.get("round_to", 1)}')
            if cli.get('calibration'):
                c = cli['calibration']
                print(f'calibration: {c["loaded"]} images from {c["source"]}')
            if cli.get('weights'):
                print(f'weights: {cli["weights"]}')
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f'(report.json unreadable: {e})')
    print('files: ' + ', '.join(f'{f} {_fmt_bytes(os.path.getsize(os.path.join(args.dir, f)))}'
                                for f in sorted(os.listdir(args.dir)) if os.path.isfile(os.path.join(args.dir, f))))
    return EXIT_OK
