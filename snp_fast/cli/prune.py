"""snp-fast prune: prune a timm model with SNP (+ least-squares re-fit) and write it to --out."""
import os
import time

from ..outputs import plan_dir
from ._common import (EXIT_OK, UsageError, create_model, family, load_checkpoint, log, model_kwargs,
                      resolve_device)
from ._ratios import ratio_spec, ratios_file


def hf_dir(path: str) -> bool:
    from ..families.hf_vit.local import is_pretrained_dir
    return is_pretrained_dir(path)


class _ReportWithExtras:
    """What save_pruned writes to report.json: the PruneReport plus what the command line knows."""

    def __init__(self, report, extra: dict):
        self.report, self.extra = report, extra

    def to_dict(self) -> dict:
        d = self.report.to_dict()
        d['cli'] = self.extra
        return d


class _BlockProgress:
    """A tqdm bar advanced by forward pre-hooks on the original model's blocks (prune() goes block by block)."""

    def __init__(self, model, enabled: bool):
        from tqdm import tqdm
        blocks = getattr(model, 'blocks', None) or []  # EfficientFormer has stages: no bar
        self.bar = tqdm(total=len(blocks), desc='pruning blocks', unit='block', disable=not enabled or not blocks,
                        leave=False)
        self.handles = [blk.register_forward_pre_hook(self._hook(i)) for i, blk in enumerate(blocks)]

    def _hook(self, i):
        def hook(_m, _inp):
            if i > self.bar.n:
                self.bar.update(i - self.bar.n)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def run(args) -> int:
    """`snp-fast prune MODEL ...`: build, load weights, calibrate, prune, save to --out; the exit status."""
    import snp_fast
    from ..calib import load_calib
    # the output's place, before any work: writable, free (or --overwrite of a model folder), no input inside
    out = plan_dir(args.out or f'{os.path.normpath(args.model)}_snp', '--out', overwrite=args.overwrite,
                   inputs=[('MODEL', args.model if os.path.isdir(args.model) else None),
                           ('--checkpoint', args.checkpoint), ('--calib', args.calib),
                           ('--ratios', args.ratios and ratios_file(args.ratios))])
    if args.num_calib < 1:
        raise UsageError(f'--num-calib must be >= 1, got {args.num_calib}')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.calib is not None and not os.path.isdir(args.calib):
        raise UsageError(f'--calib {args.calib}: ' + ('not a directory' if os.path.exists(args.calib)
                                                      else 'no such directory'))
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UsageError(f'--checkpoint {args.checkpoint}: no such file')
    device = resolve_device(args.device)
    kwargs = model_kwargs(args.model_kwargs)
    progress = not args.quiet
    t_start = time.perf_counter()

    if hf_dir(args.model):
        return _run_hf(args, out, device, progress, t_start)
    meta = create_model(args.model, kwargs, device='meta')  # cheap: fail fast on bad names/ratios/targets
    if args.plot and family(meta).name != 'vit':
        raise UsageError(f'--plot draws ViT CLS attention maps; it is not available for {type(meta).__name__}')
    if args.plot and any(type(b.attn).__name__ != 'Attention' for b in meta.blocks):
        raise UsageError(f'--plot reads q and k from timm\'s plain Attention; {args.model} has '
                         f'{type(meta.blocks[0].attn).__name__} (RoPE / fused variants are not drawn)')
    ratios, preset, alloc, preset_note = ratio_spec(args, meta)
    if alloc is not None:
        log(alloc.describe())

    t0 = time.perf_counter()
    if args.pretrained:
        model = create_model(args.model, kwargs, pretrained=True)
        weights = 'pretrained (timm hub)'
    else:
        model = create_model(args.model, kwargs, device='cpu')
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
            weights = os.path.abspath(args.checkpoint)
        else:
            weights = 'random initialisation'
            log('warning: no --checkpoint or --pretrained: pruning a RANDOMLY INITIALISED model')
    model = model.to(device).eval()
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib, info = load_calib(model, args.calib, args.num_calib, seed=args.seed, progress=progress)
    t_calib = time.perf_counter() - t0
    log(info.describe())
    if info.loaded < args.num_calib:
        log(f'note: {info.loaded} calibration images available, fewer than --num-calib {args.num_calib}')

    prog = _BlockProgress(model, progress)
    try:
        pruned, report = snp_fast.prune(model, calib.to(device), ratios=ratios, refit=not args.no_refit,
                                        backend=args.backend, precision=args.precision,
                                        batch_size=args.batch_size)
    finally:
        prog.close()
    if preset is not None:
        # the recipe/report record the resolved ratios; name the preset too (and, as prune(preset=) would, that
        # its quoted MACs are another model's)
        report.settings['preset'] = preset
        if preset_note:
            report.notes.append(preset_note)
    png = None
    t_plot = 0.0
    if args.plot:
        from ..plot import plot_attention
        t0 = time.perf_counter()
        png = plot_attention(model, pruned, calib[0], title=f'{args.model}: CLS attention, original (top) vs pruned '
                                                            f'(bottom), {report.macs_after / 1e9:.3g} of '
                                                            f'{report.macs_before / 1e9:.3g} GMACs')
        t_plot = time.perf_counter() - t0

    extra = {'command': getattr(args, 'argv', None),
             'model': args.model, 'model_kwargs': kwargs, 'weights': weights,
             'calibration': info.to_dict(), 'allocation': alloc.to_dict() if alloc else None,
             'preset': preset, 'round_to': args.round_to, 'device': str(device),
             'times': {'load_model': t_load, 'load_calibration': t_calib, 'plot': t_plot}}
    snp_fast.save_pruned(pruned.cpu(), out, overwrite=args.overwrite, report=_ReportWithExtras(report, extra),
                         files={'attention.png': png} if png is not None else None)

    print(f'{args.model} ({weights}), {info.loaded} calibration images, '
          + (f'preset {preset}' if preset else alloc.describe() if alloc else f'ratios from {args.ratios}')
          + ('' if args.round_to == 1 else f', round-to {args.round_to}') + (', no re-fit' if args.no_refit else ''))
    print(report.summary())
    print(f'other phases: load model {t_load:.2f}s, load calibration {t_calib:.2f}s'
          + (f', plot {t_plot:.2f}s' if args.plot else '') + f'; wall {time.perf_counter() - t_start:.1f}s')
    print(f'wrote {out}/ (model.safetensors, recipe.json, report.json' + (', attention.png)' if png else ')'))
    return EXIT_OK


def _run_hf(args, out, device, progress, t_start) -> int:
    """MODEL is a transformers save_pretrained folder: read it offline, calibrate with its image processor's
    preprocessing, prune with --ratios, save (the recipe records that preprocessing for `snp-fast eval`)."""
    import snp_fast
    from ..calib import load_calib
    from ..families.hf_vit.local import data_config_from_dir, load_pretrained_dir
    for flag, given in (('--checkpoint', args.checkpoint), ('--pretrained', args.pretrained),
                        ('--model-kwargs', args.model_kwargs), ('--preset', args.preset), ('--flops', args.flops),
                        ('--params', args.params), ('--plot', args.plot)):
        if given:
            raise UsageError(f'{flag} is for timm models; MODEL {args.model} is a transformers folder (give --ratios)')
    if not args.ratios:
        raise UsageError(f'MODEL {args.model} is a transformers folder: give --ratios (presets and --flops are '
                         'timm-only)')
    try:
        model = load_pretrained_dir(args.model).to(device)
    except OSError as e:
        raise UsageError(f'MODEL {args.model}: transformers could not read it offline: {e}') from None
    config = data_config_from_dir(args.model, model)
    if config is None:
        size = model.config.image_size
        config = {'input_size': (model.config.num_channels, size, size), 'mean': (0.5,) * model.config.num_channels,
                  'std': (0.5,) * model.config.num_channels, 'interpolation': 'bilinear', 'crop_pct': 1.0,
                  'crop_mode': 'center'}
        log(f'note: {args.model} has no preprocessor_config.json; calibration uses {config}')
    ratios, _, _, _ = ratio_spec(args, model)
    calib, info = load_calib(model, args.calib, args.num_calib, seed=args.seed, progress=progress, config=config)
    log(info.describe())
    pruned, report = snp_fast.prune(model, calib.to(device), ratios=ratios, refit=not args.no_refit,
                                    backend=args.backend, precision=args.precision, batch_size=args.batch_size)
    pruned.snp_recipe['data_config'] = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    extra = {'command': getattr(args, 'argv', None), 'model': os.path.abspath(args.model),
             'weights': 'the folder\'s own', 'calibration': info.to_dict(), 'device': str(device)}
    snp_fast.save_pruned(pruned.cpu(), out, overwrite=args.overwrite, report=_ReportWithExtras(report, extra))
    print(f'{args.model} ({type(model).__name__}), {info.loaded} calibration images, ratios from {args.ratios}')
    print(report.summary())
    print(f'wall {time.perf_counter() - t_start:.1f}s; wrote {out}/ (model.safetensors, recipe.json, report.json)')
    return EXIT_OK
