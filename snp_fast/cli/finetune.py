"""snp-fast finetune: recover accuracy by distillation from the unpruned teacher (KD + CE), torchrun-ready."""
import os

from ..outputs import check_parent, plan_dir
from ._common import EXIT_OK, UsageError, create_model, family, load_checkpoint, log, model_kwargs, resolve_device


def _task_data(name: str):
    """(x_train, y_train, x_val, y_val, shipped teacher loader) of a --data task."""
    from .. import demo
    if name == 'digits':
        return (*demo.digits_data(), demo.load_digits_vit)
    x_tr, y_tr, x_te, y_te = demo.faces_data()
    return demo.faces_crop(x_tr), y_tr, demo.faces_crop(x_te), y_te, demo.load_faces_vit


def run(args) -> int:
    """`snp-fast finetune DIR --data TASK ...`: distil the teacher into the pruned model, save to --out; the exit
    status."""
    import torch
    import snp_fast
    from ..finetune import FinetuneConfig, finetune, init_distributed
    from ..io import load_recipe
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    out = os.path.abspath(args.out or args.dir.rstrip('/') + '_ft')
    ckpt = os.path.abspath(args.checkpoint_dir or out + '.ckpt')
    # the outputs' places, before any training (the checkpoint folder is finetune.py's: only its place here)
    if os.path.exists(ckpt) and not os.path.isdir(ckpt):
        raise UsageError(f'--checkpoint-dir {ckpt}: exists and is not a directory')
    check_parent(ckpt, '--checkpoint-dir')
    plan_dir(out, '--out', overwrite=args.overwrite,
             inputs=[('DIR', args.dir), ('--teacher-weights', args.teacher_weights), ('--checkpoint-dir', ckpt)])
    if args.resume and not os.path.isfile(os.path.join(ckpt, 'checkpoint.json')):
        raise UsageError(f'--resume: no checkpoint in {ckpt}')
    for flag in ('limit_train', 'limit_val', 'stop_after'):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    if args.teacher_weights is not None and not os.path.isfile(args.teacher_weights):
        raise UsageError(f'--teacher-weights {args.teacher_weights}: no such file')
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup=args.warmup, alpha=args.alpha, temperature=args.temperature, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, amp=not args.no_amp)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(f'--{str(e).replace("_", "-")}') from None

    recipe = load_recipe(args.dir)
    fam = family(recipe)
    if fam.name != 'vit':
        raise UsageError(f'DIR {args.dir} holds a pruned {fam.name} model; finetune takes the ViT family only')
    x_tr, y_tr, x_val, y_val, shipped = _task_data(args.data)
    if args.limit_train:
        x_tr, y_tr = x_tr[:args.limit_train], y_tr[:args.limit_train]
    if args.limit_val:
        x_val, y_val = x_val[:args.limit_val], y_val[:args.limit_val]
    if args.teacher_weights:
        name = args.teacher or recipe.get('timm_name')
        if not name:
            raise UsageError(f'{args.dir}/recipe.json names no timm model: pass --teacher MODEL')
        kwargs = {**(recipe.get('timm_kwargs') or {}), **model_kwargs(args.model_kwargs)}
        teacher = create_model(name, kwargs, device='cpu')
        load_checkpoint(teacher, args.teacher_weights, '--teacher-weights')
        how = os.path.abspath(args.teacher_weights)
    else:
        for flag, given in (('--teacher', args.teacher), ('--model-kwargs', args.model_kwargs)):
            if given is not None:
                raise UsageError(f'{flag} needs --teacher-weights (the shipped teacher is used without it)')
        teacher, how = shipped(), f'shipped {args.data} ViT'
    try:
        before = fam.dims_type.from_dict(recipe['dims_before'])
    except (KeyError, TypeError, ValueError) as e:
        raise snp_fast.RecipeError(f'{args.dir}/recipe.json: malformed dims: {e}') from None
    if fam.model_dims(teacher) != before:
        raise UsageError(f'the teacher ({how}) is not the model {args.dir} was pruned from (its widths differ from '
                         'the recipe\'s dims_before); pass the unpruned weights with --teacher-weights')

    rank, world, auto_dev = init_distributed()
    try:
        device = auto_dev if args.device == 'auto' or world > 1 else resolve_device(args.device)
        student = snp_fast.load_pruned(args.dir)
        from ..demo import accuracy
        acc_t, acc_0 = accuracy(teacher, x_val, y_val), accuracy(student, x_val, y_val)
        say = print if rank == 0 else (lambda *a, **k: None)
        say(f'fine-tuning {args.dir} ({recipe.get("timm_name")}) on {args.data}: {len(y_tr)} training images, '
            f'{world} process(es), global batch {cfg.batch_size}, {cfg.epochs} epochs; teacher: {how}')
        res = finetune(student, teacher, x_tr, y_tr, cfg, out=out, overwrite=args.overwrite, checkpoint_dir=ckpt,
                       resume=args.resume, stop_after=args.stop_after, val=(x_val, y_val), device=device,
                       log=lambda m: log(m) if rank == 0 else None)
        acc_1 = accuracy(res.model.cpu(), x_val, y_val)
        say(f'held-out top-1 ({len(y_val)} images): teacher {acc_t:.2%}, pruned {acc_0:.2%} -> fine-tuned {acc_1:.2%}')
        say(f'wrote {out}/' if res.out else f'stopped at step {res.steps}; continue with --resume (checkpoint {ckpt})')
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return EXIT_OK
