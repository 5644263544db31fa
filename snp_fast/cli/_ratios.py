"""--preset / --ratios / --flops / --params / --round-to, shared by prune and bench: the ratios to prune with."""
import json
import os

from ._common import UsageError, family_name, log


def ratio_spec(args, model):
    """(ratios for prune(), preset name or None, Allocation or None, the preset's width warning or None) from
    --preset/--ratios/--flops/--params."""
    from .. import allocate as al
    from ..models.vit import model_dims
    from ..ratios import preset_mismatch, resolve_ratios
    if args.round_to < 1:
        raise UsageError(f'--round-to must be >= 1, got {args.round_to}')
    if family_name(model) == 'efficientformer':
        return _efficientformer_ratio_spec(args, model)
    depth = len(model_dims(model).blocks)
    if args.flops or args.params:
        flag, metric, text = ('--flops', 'macs', args.flops) if args.flops else ('--params', 'params', args.params)
        try:
            target = al.parse_quantity(text, flag)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            a = al.allocate(model, target, metric, round_to=args.round_to)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return a.ratios, None, a, None
    if args.preset:
        from ..presets import list_presets
        if args.preset not in list_presets():
            raise UsageError(f'--preset {args.preset!r} is not a preset; available: {", ".join(list_presets())}')
        spec, where = args.preset, f'--preset {args.preset}'
        try:
            mismatch = preset_mismatch(args.preset, model_dims(model))
        except ValueError as e:
            raise UsageError(f'{where}: {e}') from None
        if mismatch:
            log(f'warning: {where}: {mismatch}')
    else:
        spec, where, mismatch = read_ratios(args.ratios), f'--ratios {args.ratios}', None
    try:
        resolved = resolve_ratios(spec, depth)
        if args.round_to > 1:
            resolved, _ = al.rounded_ratios(model, resolved, args.round_to)
    except ValueError as e:
        raise UsageError(f'{where}: {e}') from None
    return resolved, (args.preset or None), None, mismatch


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


def _efficientformer_ratio_spec(args, model):
    """--preset / --ratios for an EfficientFormer, checked against its stages and MetaBlocks (prune() resolves
    them again); the MACs allocator (--flops/--params) and --round-to are ViT-only."""
    from ..models import efficientformer
    if args.flops or args.params or args.round_to > 1:
        flag = '--flops' if args.flops else '--params' if args.params else '--round-to'
        raise UsageError(f'{flag} is not available for EfficientFormer (the allocator knows the ViT family only); '
                         'use --preset efficientformer_l1_0p6G / _0p5G or --ratios')
    if args.preset:
        spec, where = args.preset, f'--preset {args.preset}'
    else:
        spec, where = read_ratios(args.ratios), f'--ratios {args.ratios}'
    dims = efficientformer.model_dims(model)
    try:
        efficientformer.resolve_ratios(spec, dims)
    except ValueError as e:
        raise UsageError(f'{where}: {e}') from None
    mismatch = efficientformer.preset_mismatch(args.preset, dims) if args.preset else None
    if mismatch:
        log(f'warning: {where}: {mismatch}')
    return spec, (args.preset or None), None, mismatch
