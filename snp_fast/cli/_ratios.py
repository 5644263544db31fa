"""--preset / --ratios / --flops / --params / --round-to, shared by prune and bench: the ratios to prune with."""
import json
import os

from ._common import UsageError, family, log


def ratio_spec(args, model):
    """(ratios for prune(), preset name or None, Allocation or None, the preset's width warning or None) from
    --preset/--ratios/--flops/--params, checked against the model's family (its widths, its presets); the
    MACs allocator (--flops/--params) and --round-to know the ViT family only."""
    from .. import allocate as al
    if args.round_to < 1:
        raise UsageError(f'--round-to must be >= 1, got {args.round_to}')
    fam = family(model)
    dims = fam.model_dims(model)
    if fam.name != 'vit' and (args.flops or args.params or args.round_to > 1):
        flag = '--flops' if args.flops else '--params' if args.params else '--round-to'
        raise UsageError(f'{flag} is not available for {type(model).__name__} (the allocator knows the ViT family '
                         'only); use --preset or --ratios')
    if args.flops or args.params:
        flag, metric, text = ('--flops', 'macs', args.flops) if args.flops else ('--params', 'params', args.params)
        try:
            target = al.parse_quantity(text, flag)
            a = al.allocate(model, target, metric, round_to=args.round_to)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return a.ratios, None, a, None
    if args.preset:
        from ..presets import list_presets
        if args.preset not in list_presets():
            raise UsageError(f'--preset {args.preset!r} is not a preset; available: {", ".join(list_presets())}')
        spec, where = args.preset, f'--preset {args.preset}'
    else:
        spec, where = read_ratios(args.ratios), f'--ratios {args.ratios}'
    try:
        resolved = fam.resolve_ratios(spec, dims)  # first: EfficientFormer's resolve refuses a ViT preset, its
        # preset_mismatch would not (the ViT family's preset_mismatch refuses an EfficientFormer preset)
        mismatch = fam.preset_mismatch(args.preset, dims) if args.preset else None
        if args.round_to > 1:
            resolved, _ = al.rounded_ratios(model, resolved, args.round_to)
    except ValueError as e:
        raise UsageError(f'{where}: {e}') from None
    if mismatch:
        log(f'warning: {where}: {mismatch}')
    # prune() resolves the ratios again: the ViT family takes its resolved form (what --round-to produces), the
    # others the form the user gave (their resolved form is not a ratio form of its own)
    return (resolved if fam.name == 'vit' else spec), (args.preset or None), None, mismatch


def ratios_file(text: str):
    """The file --ratios names, or None when it is inline JSON."""
    return text if os.path.isfile(text) else None


def read_ratios(path: str):
    """The ratios of --ratios: a JSON file, or inline JSON (--ratios 0.5, --ratios '{"qk": 0.5, "embed": 0.2}')."""
    if os.path.isfile(path):
        try:
            with open(path) as f:
                spec = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f'--ratios {path}: not valid JSON: {e}') from None
    else:
        try:
            spec = json.loads(path)
        except json.JSONDecodeError:
            raise UsageError(f'--ratios {path}: no such file (nor inline JSON ratios)') from None
        if not isinstance(spec, (int, float, dict)) or isinstance(spec, bool):
            raise UsageError(f'--ratios {path}: no such file (nor inline JSON ratios)')
    if isinstance(spec, str):
        raise UsageError(f'--ratios {path}: give ratios (a number or an object), not a string; use --preset for presets')
    return spec
