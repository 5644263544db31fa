"""snp-fast eval: top-1, top-5, mean loss and images/s of a pruned folder or a timm model on an image folder."""
import json
import os

from ..outputs import plan_file, write_file
from ._common import EXIT_OK, UsageError, create_model, load_checkpoint, model_kwargs, resolve_device


def run(args) -> int:
    """`snp-fast eval TARGET --data DIR`: evaluate with timm's preprocessing (the recipe's, for a pruned folder)."""
    import torch
    import snp_fast
    from ..calib import data_config
    from ..evaluate import evaluate, folder_loader
    if not os.path.isdir(args.data):
        raise UsageError(f'--data {args.data}: no such directory')
    out = plan_file(args.json, '--json', overwrite=args.overwrite, inputs=[('--data', args.data)]) if args.json \
        else None
    device = resolve_device(args.device)
    if os.path.isdir(args.target):
        if args.checkpoint or args.pretrained or args.model_kwargs:
            raise UsageError('--checkpoint / --pretrained / --model-kwargs build a timm model; TARGET is a pruned '
                             'folder')
        model = snp_fast.load_pruned(args.target, device=str(device))
        config = dict(model.snp_recipe.get('data_config') or data_config(model))
    else:
        model = create_model(args.target, model_kwargs(args.model_kwargs), pretrained=args.pretrained, device='cpu')
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
        elif not args.pretrained:
            raise UsageError(f'TARGET {args.target}: a timm name needs --checkpoint PATH or --pretrained (random '
                             'weights measure nothing)')
        model = model.to(device).eval()
        config = data_config(model)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if args.img_size:
        config['input_size'] = (config['input_size'][0], args.img_size, args.img_size)
    for key in ('mean', 'std'):
        v = getattr(args, key)
        if v:
            if len(v) != config['input_size'][0]:
                raise UsageError(f'--{key} gives {len(v)} values; the model takes {config["input_size"][0]} channels')
            config[key] = tuple(v)
    if args.interpolation:
        config['interpolation'] = args.interpolation
    if args.crop_pct is not None:
        if not 0 < args.crop_pct <= 1:
            raise UsageError(f'--crop-pct must be in (0, 1], got {args.crop_pct}')
        config['crop_pct'] = args.crop_pct
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError('-b/--batch-size must be >= 1 and -j/--workers >= 0')
    with torch.no_grad():
        result = evaluate(model, folder_loader(args.data, config, args.batch_size, args.workers), device,
                          progress=not args.no_progress)
    print(f'{args.target} on {args.data}: {result}')
    if out is not None:
        record = {'target': args.target, 'data': args.data, 'data_config': config, **result.to_dict()}
        write_file(out, (json.dumps(record, indent=1, default=list) + '\n').encode())
    return EXIT_OK
