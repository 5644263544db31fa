"""snp-fast inspect: what a directory written by prune holds (architecture, widths, sizes, settings, files)."""
import json
import os

from ._common import EXIT_OK, UsageError, family


def _fmt_bytes(n: int) -> str:
    for unit, f in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= f:
            return f'{n / f:.2f} {unit}'
    return f'{n} B'


def _inspect_sizes(directory: str, recipe: dict) -> None:
    """The header, then the lines the prune report prints for these widths (report.PruneReport.size_lines: the
    totals and the family's own width table)."""
    from ..io import RecipeError
    from ..macs import count_macs, count_params, meta_copy
    from ..report import PruneReport
    fam = family(recipe)
    try:
        before, after = fam.dims_type.from_dict(recipe['dims_before']), fam.dims_type.from_dict(recipe['dims_after'])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f'{directory}/recipe.json: malformed dims: {e}') from None
    name, kw = _inspect_header(directory, recipe)
    try:
        meta = fam.build_unpruned(recipe)  # on the meta device, by the family's own rules
        small = fam.apply_dims(meta_copy(meta), after)
        sizes = (count_params(meta), count_params(small), count_macs(meta), count_macs(small))
    except Exception as e:  # noqa: BLE001 -- still print the widths
        print(f'(cannot rebuild {name!r} to count params/MACs: {e})')
        print('\n'.join(fam.width_lines(before, after)))
        return
    report = PruneReport(before, after, *sizes, times={}, settings={}, width_lines=fam.width_lines)
    print('\n'.join(report.size_lines()))


def _inspect_header(directory: str, recipe: dict):
    name, kw = recipe.get('timm_name') or recipe.get('hf_class'), recipe.get('timm_kwargs') or {}
    print(f'{directory}: {name} pruned with snp_fast {recipe.get("snp_fast_version", "?")} ({recipe.get("format")})')
    if kw:
        print('timm kwargs: ' + json.dumps(kw))
    return name, kw


def run(args) -> int:
    """`snp-fast inspect DIR`: print what a pruned-model folder holds; the exit status."""
    from ..io import load_recipe
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    recipe = load_recipe(args.dir)
    _inspect_sizes(args.dir, recipe)
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
