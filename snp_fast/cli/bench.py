"""snp-fast bench: latency of the original vs the pruned model (eager, torch.compile, ONNX Runtime)."""
import json
import os

from ..outputs import plan_file, write_file
from ._common import EXIT_OK, UsageError, create_model, family, log, model_kwargs, resolve_device
from ._ratios import ratio_spec, ratios_file


def _random_init_(model) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ('norm' in name or name.endswith('gamma')) and name.endswith(('weight', 'gamma')):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _init_buffers_(pruned, original) -> None:
    """to_empty() leaves `pruned`'s buffers uninitialised: index tables (EfficientFormer's attention_bias_idxs) come
    from `original` where the shapes agree, BatchNorm statistics start at (0, 1), the rest at 0. (Either model may be
    the one made with to_empty: bench DIR rebuilds the original that way, beside the saved pruned model.)"""
    import torch
    orig = dict(original.named_buffers())
    with torch.no_grad():
        for name, b in pruned.named_buffers():
            if name in orig and orig[name].shape == b.shape:
                b.copy_(orig[name])
            elif name.endswith('running_var'):
                b.fill_(1)
            else:
                b.zero_()


def load_dir_pair(directory: str, device):
    """(original, pruned, name) of a folder written by prune: the pruned model as saved, the original rebuilt by
    its family from the recipe (never from the network) with random weights (latency does not depend on them)."""
    import snp_fast
    from ..io import load_recipe
    recipe = load_recipe(directory)
    pruned = snp_fast.load_pruned(directory, device=str(device) if device.type != 'cpu' else 'cpu')
    try:
        original = family(recipe).build_unpruned(recipe).to_empty(device='cpu')
    except ValueError as e:
        raise snp_fast.RecipeError(f'{directory}/recipe.json: {e}') from None
    _random_init_(original)
    _init_buffers_(original, pruned)
    # the original in the pruned model's dtype: a speed-up that mixes in fp32 vs fp16 / bf16 is not pruning's
    dtype = next(pruned.parameters()).dtype
    name = recipe.get('timm_name') or recipe.get('hf_class')
    return original.to(device, dtype).eval(), pruned.to(device).eval(), name


def run(args) -> int:
    """`snp-fast bench MODEL_OR_DIR ...`: time the original vs the pruned model; the exit status."""
    import torch
    import snp_fast
    from .. import bench
    from ..macs import meta_copy
    try:
        batches = [int(b) for b in args.batch.split(',') if b.strip()]
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f'--batch {args.batch!r}: expected positive integers separated by commas, e.g. 1,8,64') from None
    if args.repeats < 1:
        raise UsageError(f'--repeats must be >= 1, got {args.repeats}')
    if args.warmup < 0:
        raise UsageError(f'--warmup must be >= 0, got {args.warmup}')
    backends = ([] if args.no_eager else ['eager']) + (['compile'] if args.compile else []) + (['onnx'] if args.onnx else [])
    if not backends:
        raise UsageError('--no-eager without --compile or --onnx leaves nothing to time')
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if args.json:  # before any timing: never over an existing file without --overwrite, never over an input
        plan_file(args.json, '--json', overwrite=args.overwrite,
                  inputs=[('MODEL_OR_DIR', args.target if os.path.isdir(args.target) else None),
                          ('--ratios', args.ratios and ratios_file(args.ratios))])
    device = resolve_device(args.device)
    has_spec = any((args.preset, args.ratios, args.flops, args.params))
    if os.path.isdir(args.target):
        if has_spec:
            raise UsageError('--preset/--ratios/--flops/--params apply to a MODEL name, not to a pruned DIR')
        original, pruned, name = load_dir_pair(args.target, device)
        what = f'{args.target} ({name})'
    else:
        if os.path.sep in args.target:
            raise UsageError(f'MODEL_OR_DIR {args.target}: no such directory')
        kwargs = model_kwargs(args.model_kwargs)
        original = create_model(args.target, kwargs, device='cpu')
        _random_init_(original)
        original = original.to(device).eval()
        pruned = None
        what = f'{args.target} (random weights)'
        if has_spec:
            ratios, preset, alloc, _ = ratio_spec(args, original)
            if alloc is not None:
                log(alloc.describe())
            fam = family(original)
            orig = fam.model_dims(original)
            dims = fam.target_dims(orig, fam.resolve_ratios(ratios, orig), [])
            pruned = fam.apply_dims(meta_copy(original), dims).to_empty(device=device)
            _random_init_(pruned)
            _init_buffers_(pruned, original)
            pruned = pruned.eval()
            what += ', pruned architecture ' + (f'preset {preset}' if preset else f'--flops {args.flops}' if args.flops
                                                else f'--params {args.params}' if args.params else f'ratios {args.ratios}')
            if args.round_to > 1:
                what += f' --round-to {args.round_to}'
    macs_o = snp_fast.count_macs(original)
    macs_p = snp_fast.count_macs(pruned) if pruned is not None else None
    log(f'timing {what}: backends {", ".join(backends)}, batches {batches}, {args.repeats} repeats after '
         f'{args.warmup} warm-up calls, {torch.get_num_threads()} threads')
    rows = bench.compare(original, pruned, batches, backends, args.repeats, args.warmup, progress=not args.quiet)
    print(f'{what}: MACs {macs_o / 1e9:.3f}G' + (f' -> {macs_p / 1e9:.3f}G' if macs_p else ''))
    print(bench.format_table(rows, macs_o / macs_p if macs_p else None))
    if args.json:
        write_file(args.json, json.dumps({'target': args.target, 'macs_original': macs_o, 'macs_pruned': macs_p,
                                            'threads': torch.get_num_threads(), 'repeats': args.repeats,
                                            'rows': rows}, indent=1).encode())
    return EXIT_OK
