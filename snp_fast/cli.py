"""snp-fast: SNP structured pruning of timm vision transformers from the command line.

    snp-fast prune deit_small_patch16_224 --checkpoint deit_s.pth --calib imagenet/val --preset deit_small_patch16_224 --out out/deit_s_2G
    snp-fast prune deit_small_patch16_224 --checkpoint deit_s.pth --flops 2.0G --round-to 8 --out out/deit_s_auto --plot
    snp-fast bench out/deit_s_2G --batch 1,8 --onnx
    snp-fast export out/deit_s_2G --onnx deit_s_2G.onnx
    snp-fast inspect out/deit_s_2G
    snp-fast finetune out/digits_snp --data digits --epochs 10 --out out/digits_snp_ft
    torchrun --nproc_per_node 2 -m snp_fast finetune out/digits_snp --data digits --out out/digits_snp_ft

Exit status: 0 ok, 2 bad usage or input (arguments, missing or unreadable files, bad ratios, unsupported
model, empty calibration folder, unreachable target), 1 internal error (or an ONNX check that fails).
A failed command leaves no output directory or file behind.
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from typing import List, Optional

__all__ = ['main', 'build_parser', 'UsageError']

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line input (exit status 2); the message names the argument or file at fault."""


def _log(msg: str = '') -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# arguments

ALLOC_HELP = """\
--flops / --params allocation rule (snp_fast.allocate): one global scale s sets every ratio,
pruning deeper blocks more, like the authors' presets. For block i of depth L, t = i/(L-1):
  q/k  = min(0.9, s*(0.6 + 0.2 t))    v = fc1 = min(0.9, s*(0.2 + 0.6 t))    embed = min(0.5, 0.2 s)
s is found by bisection so that the pruned model's MACs (one image, the model's input size; the
paper's "GFLOPs") or parameter count is within 2 % of the target; the achieved value is printed and
stored in report.json. --round-to N rounds every kept width (q/k and v per head, fc1, embedding) to a
multiple of N where the original width allows it (also with --preset / --ratios)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model-kwargs', metavar='JSON', default=None,
                   help='extra timm.create_model keyword arguments as a JSON object, e.g. \'{"img_size": 384}\'')


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = argparse.ArgumentParser(prog='snp-fast', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='Run "snp-fast COMMAND --help" for the options of a command.')
    ap.add_argument('--version', action='version', version=f'snp_fast {__version__}')
    sub = ap.add_subparsers(dest='command', metavar='COMMAND', required=True)

    p = sub.add_parser('prune', help='prune a timm ViT/DeiT with SNP (+ least-squares re-fit) and save it',
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=ALLOC_HELP,
                       description='Prune a timm VisionTransformer with SNP and write model.safetensors, recipe.json '
                                   'and report.json to --out.')
    p.add_argument('model', metavar='MODEL', help='timm model name, e.g. deit_small_patch16_224')
    w = p.add_mutually_exclusive_group()
    w.add_argument('--checkpoint', metavar='PATH',
                   help='weights: a .safetensors file or a torch state dict (loaded with weights_only=True)')
    w.add_argument('--pretrained', action='store_true', help='weights from the timm hub (needs internet or a cache)')
    _add_model_args(p)
    p.add_argument('--calib', metavar='DIR', help='calibration images: an ImageFolder tree or a flat folder '
                   '(default: real sample photos shipped with scikit-learn / scikit-image)')
    p.add_argument('--num-calib', type=int, default=64, metavar='N', help='calibration images to use (default 64)')
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument('--preset', metavar='NAME', help='the authors\' per-block ratios; one of: ' + ', '.join(_presets()))
    t.add_argument('--ratios', metavar='FILE.json', help='ratios (fraction REMOVED), a JSON file or inline JSON: a number, '
                   '{"qk","v","mlp","embed"} or {"blocks": [{"qk","v","mlp"}, ...], "embed"}')
    t.add_argument('--flops', metavar='MACS', help='target MACs per image, e.g. 2.0G (automatic allocation, see below)')
    t.add_argument('--params', metavar='N', help='target parameter count, e.g. 10M (automatic allocation)')
    p.add_argument('--round-to', type=int, default=1, metavar='N', help='keep widths multiples of N where possible')
    p.add_argument('--out', metavar='DIR', help='output directory (default: ./MODEL_snp); must not exist or be empty')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out directory')
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    p.add_argument('--backend', default='auto',
                   help='kernels to prefer: auto | reference | cpu | cuda | triton (each op on it where it has it)')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                   help='precision of the redundancy cosines and re-fit Grams: fp32 (default, the pure-Python '
                   "version's selection) or bf16 (faster on CPUs with AMX / AVX512-BF16; near-tied filters may swap)")
    p.add_argument('--batch-size', type=int, default=32, metavar='N', help='images per chunk while pruning')
    p.add_argument('--no-refit', action='store_true', help='skip the least-squares re-fit (SNP selection only)')
    p.add_argument('--plot', action='store_true',
                   help='also write attention.png: CLS attention maps, original vs pruned, on one calibration image')
    p.add_argument('--seed', type=int, default=0, help='seed for the choice of calibration images')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser('bench', help='latency of the original vs the pruned model',
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           'Latency (median over --repeats after --warmup calls, random input; the two models timed '
                           'in alternation) of the original vs the pruned model. MODEL_OR_DIR: a directory written by '
                           '"prune" (the original is rebuilt from its recipe), or a timm name, optionally with '
                           '--preset / --ratios / --flops / --params to time a pruned architecture of random weights '
                           '(latency does not depend on the weights).', 100), epilog=ALLOC_HELP)
    p.add_argument('target', metavar='MODEL_OR_DIR')
    _add_model_args(p)
    t = p.add_mutually_exclusive_group()
    t.add_argument('--preset', metavar='NAME', help='with a MODEL name: time the architecture of this preset')
    t.add_argument('--ratios', metavar='FILE.json', help='with a MODEL name: ratios as in "prune --ratios"')
    t.add_argument('--flops', metavar='MACS', help='with a MODEL name: the allocation for this MACs target')
    t.add_argument('--params', metavar='N', help='with a MODEL name: the allocation for this parameter target')
    p.add_argument('--round-to', type=int, default=1, metavar='N', help='keep widths multiples of N where possible')
    p.add_argument('--batch', default='1,8,64', metavar='B1,B2,...', help='batch sizes (default 1,8,64)')
    p.add_argument('--onnx', action='store_true', help='also time ONNX Runtime (CPU)')
    p.add_argument('--compile', action='store_true', help='also time torch.compile')
    p.add_argument('--no-eager', action='store_true', help='skip eager PyTorch')
    p.add_argument('--repeats', type=int, default=10, metavar='N', help='timed calls per measurement (median)')
    p.add_argument('--warmup', type=int, default=3, metavar='N', help='untimed calls first')
    p.add_argument('--threads', type=int, default=None, metavar='N', help='torch intra-op threads')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', metavar='FILE', help='also write the rows as JSON')
    p.add_argument('--quiet', action='store_true')
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser('export', help='export a pruned model to ONNX and check it with ONNX Runtime',
                       description='Export a directory written by "prune" to ONNX (opset >= 17, dynamic batch) and '
                                   'check it with ONNX Runtime on a random input: exit 1 if the max abs difference '
                                   'from PyTorch exceeds --tol.')
    p.add_argument('dir', metavar='DIR')
    p.add_argument('--onnx', required=True, metavar='OUT.onnx')
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--tol', type=float, default=1e-4, help='max abs difference allowed (default 1e-4)')
    p.add_argument('--overwrite', action='store_true')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser('inspect', help='print the recipe of a pruned model and its sizes',
                       description='Print what a directory written by "prune" holds: the architecture, widths '
                                   'before/after per block, parameters, MACs, settings, file sizes.')
    p.add_argument('dir', metavar='DIR')
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser('finetune', help='recover accuracy by distillation from the unpruned teacher (KD + CE)',
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           'Fine-tune a directory written by "prune" with knowledge distillation from the unpruned '
                           'teacher: loss = alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE, AdamW, linear '
                           'warm-up then cosine decay, AMP on CUDA. Checkpoints (safetensors + JSON) go to '
                           '--checkpoint-dir; --resume continues from there. Under torchrun, DistributedDataParallel '
                           '(gloo on CPU, nccl on CUDA) with --batch-size the GLOBAL batch; only rank 0 writes.', 100)
                       + '\n\n  torchrun --nproc_per_node 2 -m snp_fast finetune DIR --data digits --out DIR_ft')
    p.add_argument('dir', metavar='DIR', help='a pruned model written by "snp-fast prune" (or snp_fast.save_pruned)')
    p.add_argument('--data', required=True, choices=('digits', 'faces'),
                   help='training/held-out data: the shipped fixtures\' tasks (scikit-learn digits 8x8; '
                        'scikit-image lfw_subset faces vs non-faces, 24x24 top-left crops)')
    p.add_argument('--teacher', metavar='MODEL', help='timm name of the unpruned teacher (default: the recipe\'s)')
    p.add_argument('--teacher-weights', metavar='PATH', help='teacher weights (.safetensors or a torch state dict); '
                   'default for --data digits/faces: the shipped fixture of that task')
    p.add_argument('--model-kwargs', metavar='JSON', default=None,
                   help='with --teacher-weights: timm.create_model keyword arguments for building the teacher, on '
                        'top of the recipe\'s (the student is the pruned model as saved)')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=64, metavar='N', help='global batch (all processes together)')
    p.add_argument('--lr', type=float, default=5e-4, help='peak AdamW learning rate (default 5e-4)')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--warmup', type=float, default=0.05, help='fraction of steps of linear warm-up (default 0.05)')
    p.add_argument('--alpha', type=float, default=0.7, help='weight of the distillation term (default 0.7)')
    p.add_argument('--temperature', type=float, default=2.0, help='distillation temperature (default 2)')
    p.add_argument('--seed', type=int, default=0, help='seed of the data order')
    p.add_argument('--out', metavar='DIR', help='output directory (default: DIR_ft); must not exist or be empty')
    p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out directory')
    p.add_argument('--checkpoint-dir', metavar='DIR', help='checkpoints (default: OUT.ckpt)')
    p.add_argument('--checkpoint-every', type=int, default=0, metavar='STEPS',
                   help='also checkpoint every STEPS steps (always at the end of each epoch)')
    p.add_argument('--resume', action='store_true', help='continue from the checkpoint in --checkpoint-dir')
    p.add_argument('--stop-after', type=int, default=None, metavar='STEPS',
                   help='stop after this many steps in total (checkpointed), to continue later with --resume')
    p.add_argument('--limit-train', type=int, default=None, metavar='N', help='use only the first N training images')
    p.add_argument('--limit-val', type=int, default=None, metavar='N', help='report top-1 on the first N held-out '
                   'images only')
    p.add_argument('--device', default='auto', help='cpu or cuda (under torchrun: cuda:LOCAL_RANK); default: cuda '
                   'if available')
    p.add_argument('--no-amp', action='store_true', help='no autocast on CUDA')
    p.set_defaults(func=cmd_finetune)
    return ap


def _presets() -> List[str]:
    from .presets import list_presets
    try:
        return list_presets()
    except Exception:  # noqa: BLE001 -- help text only
        return []


# ------------------------------------------------------------------------------------------------
# shared helpers

def _model_kwargs(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f'--model-kwargs is not valid JSON: {e}') from None
    if not isinstance(kw, dict):
        raise UsageError(f'--model-kwargs must be a JSON object, got {type(kw).__name__}')
    return kw


def check_supported(model) -> None:
    """The model family's own structure check (ViT family or EfficientFormer)."""
    from .models import efficientformer, vit
    (efficientformer if efficientformer.is_efficientformer(model) else vit).check_supported(model)


def _is_efficientformer(model) -> bool:
    from .models import efficientformer
    return efficientformer.is_efficientformer(model)


def _create_model(name: str, kwargs: dict, pretrained: bool = False, device='meta'):
    import timm
    if not timm.is_model(name) and (os.path.sep in name or os.path.exists(name)):
        raise UsageError(f'MODEL {name!r} is a path, not a timm model name')
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise UsageError(f'MODEL {name!r} is not a timm model name' + (f' (similar: {", ".join(close)})' if close else ''))
    if pretrained:
        return _create_pretrained(name, kwargs)
    try:
        model = timm.create_model(name, pretrained=False, device=device, **kwargs)
    except Exception as e:  # noqa: BLE001 -- whatever timm raises for these kwargs (ZeroDivisionError included)
        raise UsageError(f'timm cannot build {name!r} with --model-kwargs {kwargs}: {type(e).__name__}: {e}') from None
    check_supported(model)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection(('huggingface.co', 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _create_pretrained(name: str, kwargs: dict):
    import timm
    offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0', 'false', 'False') or not _hub_reachable()
    hc = saved = None
    saved_env = os.environ.get('HF_HUB_OFFLINE')
    if offline:  # no retries against an unreachable hub: use the local cache or fail at once
        try:
            import huggingface_hub.constants as hc
            saved, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
        except ImportError:
            pass
        os.environ['HF_HUB_OFFLINE'] = '1'
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 -- hub, cache and network errors come in many types
        why = ('huggingface.co cannot be reached (offline?) and the weights are not in the local cache'
               if offline else f'{type(e).__name__}: {e}')
        raise UsageError(f'--pretrained: cannot get pretrained weights for {name!r}: {why}. Download them where there '
                         f'is internet and pass --checkpoint PATH instead.') from None
    finally:
        if offline:
            if hc is not None:
                hc.HF_HUB_OFFLINE = saved
            if saved_env is None:
                os.environ.pop('HF_HUB_OFFLINE', None)
            else:
                os.environ['HF_HUB_OFFLINE'] = saved_env
    check_supported(model)
    return model


def load_state(path: str) -> dict:
    """A state dict from a .safetensors file or a torch checkpoint (weights_only=True); unwraps {'model': ...}."""
    import torch
    if not os.path.exists(path):
        raise UsageError(f'--checkpoint {path}: no such file')
    if not os.path.isfile(path):
        raise UsageError(f'--checkpoint {path}: not a file')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 -- corrupt files raise anything from pickle/zip/safetensors
        kind = 'a safetensors file' if path.endswith('.safetensors') else 'a torch state dict (weights_only=True)'
        raise UsageError(f'--checkpoint {path}: cannot be read as {kind}: {type(e).__name__}: {e}') from None
    if isinstance(sd, dict):
        for key in ('model', 'state_dict', 'model_state', 'module'):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f'--checkpoint {path}: does not hold a state dict of tensors')
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model, path: str) -> None:
    sd = load_state(path)
    try:
        model.load_state_dict(sd, strict=True)
        return
    except RuntimeError as e:
        first = e
    try:  # timm's own conversion (pos_embed resizing, original DeiT/ViT key names)
        from timm.models.vision_transformer import checkpoint_filter_fn
        model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
        return
    except Exception:  # noqa: BLE001 -- report the plain mismatch below
        pass
    msg = str(first).replace('\n\t', ' ').replace('\n', ' ')
    raise UsageError(f'--checkpoint {path} does not match {type(model).__name__} '
                     f'{getattr(model, "pretrained_cfg", {}).get("architecture", "")}: {msg[:800]}')


def _ratio_spec(args, model, flag_prefix: str = ''):
    """(ratios dict for prune(), preset name or None, Allocation or None, the preset's width warning or None) from
    --preset/--ratios/--flops/--params."""
    from . import allocate as al
    from .models.vit import model_dims
    from .ratios import preset_mismatch, resolve_ratios
    if args.round_to < 1:
        raise UsageError(f'--round-to must be >= 1, got {args.round_to}')
    if _is_efficientformer(model):
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
        from .presets import list_presets
        if args.preset not in list_presets():
            raise UsageError(f'--preset {args.preset!r} is not a preset; available: {", ".join(list_presets())}')
        spec, where = args.preset, f'--preset {args.preset}'
        try:
            mismatch = preset_mismatch(args.preset, model_dims(model))
        except ValueError as e:
            raise UsageError(f'{where}: {e}') from None
        if mismatch:
            _log(f'warning: {where}: {mismatch}')
    else:
        spec, where, mismatch = _read_ratios(args.ratios), f'--ratios {args.ratios}', None
    try:
        resolved = resolve_ratios(spec, depth)
        if args.round_to > 1:
            resolved, _ = al.rounded_ratios(model, resolved, args.round_to)
    except ValueError as e:
        raise UsageError(f'{where}: {e}') from None
    return resolved, (args.preset or None), None, mismatch


def _read_ratios(path: str):
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
    from .models import efficientformer
    if args.flops or args.params or args.round_to > 1:
        flag = '--flops' if args.flops else '--params' if args.params else '--round-to'
        raise UsageError(f'{flag} is not available for EfficientFormer (the allocator knows the ViT family only); '
                         'use --preset efficientformer_l1_0p6G / _0p5G or --ratios')
    if args.preset:
        spec, where = args.preset, f'--preset {args.preset}'
    else:
        spec, where = _read_ratios(args.ratios), f'--ratios {args.ratios}'
    dims = efficientformer.model_dims(model)
    try:
        efficientformer.resolve_ratios(spec, dims)
    except ValueError as e:
        raise UsageError(f'{where}: {e}') from None
    mismatch = efficientformer.preset_mismatch(args.preset, dims) if args.preset else None
    if mismatch:
        _log(f'warning: {where}: {mismatch}')
    return spec, (args.preset or None), None, mismatch


def _resolve_device(name: str):
    import torch
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f'--device {name!r}: {e}') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine')
    return dev


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


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder above `path` that does not exist yet (None: its parent exists): what creating
    `path`'s folders would make, and what a failure must remove again."""
    made = None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        made, parent = parent, os.path.dirname(parent)
    return made


def _check_parent(path: str, flag: str) -> None:
    """Before any work: the nearest existing folder above `path` must be a writable folder."""
    missing = _first_missing(path)
    parent = os.path.dirname(missing if missing is not None else os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f'{flag} {path}: {parent} is a file, not a folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f'{flag} {path}: {parent} is not writable')


def _dir_is_free(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ------------------------------------------------------------------------------------------------
# prune

def cmd_prune(args) -> int:
    import snp_fast
    from .calib import load_calib
    out = os.path.abspath(args.out or f'{args.model}_snp')
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f'--out {out}: exists and is not a directory')
    _check_parent(out, '--out')
    if not _dir_is_free(out) and not args.overwrite:
        raise UsageError(f'--out {out}: exists and is not empty (pass --overwrite to replace it)')
    if args.num_calib < 1:
        raise UsageError(f'--num-calib must be >= 1, got {args.num_calib}')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.calib is not None and not os.path.isdir(args.calib):
        raise UsageError(f'--calib {args.calib}: ' + ('not a directory' if os.path.exists(args.calib)
                                                      else 'no such directory'))
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise UsageError(f'--checkpoint {args.checkpoint}: no such file')
    for flag in ('checkpoint', 'calib'):  # --overwrite replaces --out as a whole: never with the run's own inputs
        if args.overwrite and getattr(args, flag) is not None and _inside(getattr(args, flag), out):
            raise UsageError(f'--{flag} {getattr(args, flag)}: inside --out {out}, which --overwrite replaces')
    device = _resolve_device(args.device)
    kwargs = _model_kwargs(args.model_kwargs)
    progress = not args.quiet
    t_start = time.perf_counter()

    meta = _create_model(args.model, kwargs, device='meta')  # cheap: fail fast on bad names/ratios/targets
    if args.plot and _is_efficientformer(meta):
        raise UsageError('--plot draws ViT CLS attention maps; it is not available for EfficientFormer')
    if args.plot and any(type(b.attn).__name__ != 'Attention' for b in meta.blocks):
        raise UsageError(f'--plot reads q and k from timm\'s plain Attention; {args.model} has '
                         f'{type(meta.blocks[0].attn).__name__} (RoPE / fused variants are not drawn)')
    ratios, preset, alloc, preset_note = _ratio_spec(args, meta)
    if alloc is not None:
        _log(alloc.describe())

    t0 = time.perf_counter()
    if args.pretrained:
        model = _create_pretrained(args.model, kwargs)
        weights = 'pretrained (timm hub)'
    else:
        model = _create_model(args.model, kwargs, device='cpu')
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint)
            weights = os.path.abspath(args.checkpoint)
        else:
            weights = 'random initialisation'
            _log('warning: no --checkpoint or --pretrained: pruning a RANDOMLY INITIALISED model')
    model = model.to(device).eval()
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib, info = load_calib(model, args.calib, args.num_calib, seed=args.seed, progress=progress)
    t_calib = time.perf_counter() - t0
    _log(info.describe())
    if info.loaded < args.num_calib:
        _log(f'note: {info.loaded} calibration images available, fewer than --num-calib {args.num_calib}')

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
        from .plot import plot_attention
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


# ------------------------------------------------------------------------------------------------
# bench

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
    """to_empty() leaves buffers uninitialised: index tables (EfficientFormer's attention_bias_idxs) come from
    the original where the shapes agree, BatchNorm statistics start at (0, 1)."""
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


def _load_dir_pair(directory: str, device):
    import timm
    import snp_fast
    from .io import load_recipe
    recipe = load_recipe(directory)
    pruned = snp_fast.load_pruned(directory, device=str(device) if device.type != 'cpu' else 'cpu')
    try:
        original = timm.create_model(recipe['timm_name'], pretrained=False, **(recipe.get('timm_kwargs') or {}))
    except Exception as e:  # noqa: BLE001
        raise snp_fast.RecipeError(f'{directory}/recipe.json: timm cannot build {recipe.get("timm_name")!r}: {e}') from e
    # the original in the pruned model's dtype: a speed-up that mixes in fp32 vs fp16 / bf16 is not pruning's
    dtype = next(pruned.parameters()).dtype
    return original.to(device, dtype).eval(), pruned.to(device).eval(), recipe['timm_name']


def cmd_bench(args) -> int:
    import torch
    import snp_fast
    from . import bench
    from .macs import meta_copy
    from .models import vit
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
    if args.json:
        if os.path.isdir(args.json):
            raise UsageError(f'--json {args.json}: is a directory')
        _check_parent(args.json, '--json')
    device = _resolve_device(args.device)
    has_spec = any((args.preset, args.ratios, args.flops, args.params))
    if os.path.isdir(args.target):
        if has_spec:
            raise UsageError('--preset/--ratios/--flops/--params apply to a MODEL name, not to a pruned DIR')
        original, pruned, name = _load_dir_pair(args.target, device)
        what = f'{args.target} ({name})'
    else:
        if os.path.sep in args.target:
            raise UsageError(f'MODEL_OR_DIR {args.target}: no such directory')
        kwargs = _model_kwargs(args.model_kwargs)
        original = _create_model(args.target, kwargs, device='cpu')
        _random_init_(original)
        original = original.to(device).eval()
        pruned = None
        what = f'{args.target} (random weights)'
        if has_spec:
            ratios, preset, alloc, _ = _ratio_spec(args, original)
            if alloc is not None:
                _log(alloc.describe())
            if _is_efficientformer(original):
                from .models import efficientformer as family
                orig = family.model_dims(original)
                dims = family.target_dims(orig, family.resolve_ratios(ratios, orig), [])
            else:
                from .ratios import resolve_ratios, target_dims
                family = vit
                dims = target_dims(vit.model_dims(original), resolve_ratios(ratios, len(original.blocks)), [])
            pruned = family.apply_dims(meta_copy(original), dims).to_empty(device=device)
            _random_init_(pruned)
            _init_buffers_(pruned, original)
            pruned = pruned.eval()
            what += ', pruned architecture ' + (f'preset {preset}' if preset else f'--flops {args.flops}' if args.flops
                                                else f'--params {args.params}' if args.params else f'ratios {args.ratios}')
            if args.round_to > 1:
                what += f' --round-to {args.round_to}'
    macs_o = snp_fast.count_macs(original)
    macs_p = snp_fast.count_macs(pruned) if pruned is not None else None
    _log(f'timing {what}: backends {", ".join(backends)}, batches {batches}, {args.repeats} repeats after '
         f'{args.warmup} warm-up calls, {torch.get_num_threads()} threads')
    rows = bench.compare(original, pruned, batches, backends, args.repeats, args.warmup, progress=not args.quiet)
    print(f'{what}: MACs {macs_o / 1e9:.3f}G' + (f' -> {macs_p / 1e9:.3f}G' if macs_p else ''))
    print(bench.format_table(rows, macs_o / macs_p if macs_p else None))
    if args.json:
        from .io import write_atomic
        write_atomic(args.json, json.dumps({'target': args.target, 'macs_original': macs_o, 'macs_pruned': macs_p,
                                            'threads': torch.get_num_threads(), 'repeats': args.repeats,
                                            'rows': rows}, indent=1).encode())
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# export / inspect

def cmd_export(args) -> int:
    import snp_fast
    from .export import MAX_OPSET, check_onnx, export_onnx
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    if not 17 <= args.opset <= MAX_OPSET:
        raise UsageError(f'--opset must be in [17, {MAX_OPSET}], got {args.opset}')
    out = os.path.abspath(args.onnx)
    if os.path.isdir(out):
        raise UsageError(f'--onnx {args.onnx}: is a directory')
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f'--onnx {args.onnx}: exists (pass --overwrite to replace it)')
    if not args.tol >= 0:
        raise UsageError(f'--tol must be a number >= 0, got {args.tol}')
    _check_parent(out, '--onnx')
    model = snp_fast.load_pruned(args.dir)
    # exported and checked beside the destination, then renamed over it: a failed check leaves what was there
    made = _first_missing(out)  # the outermost folder this export creates, removed again if it fails
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.snp_fast_', suffix='.onnx', dir=os.path.dirname(out))
    os.close(fd)
    try:
        t0 = time.perf_counter()
        export_onnx(model, tmp, opset=args.opset)
        t_export = time.perf_counter() - t0
        diff = check_onnx(model, tmp)
        print(f'ONNX Runtime vs PyTorch on a random input: max abs diff {diff:.3g} (tolerance {args.tol:g})')
        if not diff <= args.tol:
            _log(f'error: ONNX check failed (max abs diff {diff:.3g} > {args.tol:g}); {out} not written')
            return EXIT_ERROR
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if made is not None and not os.path.exists(out):
            shutil.rmtree(made, ignore_errors=True)
    print(f'exported {args.dir} -> {out} ({os.path.getsize(out) / 1e6:.2f} MB, opset {args.opset}, dynamic batch) '
          f'in {t_export:.1f}s')
    return EXIT_OK


def _fmt_bytes(n: int) -> str:
    for unit, f in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= f:
            return f'{n / f:.2f} {unit}'
    return f'{n} B'


def _inspect_vit(directory: str, recipe: dict) -> None:
    import timm
    from .allocate import dims_cost
    from .io import RecipeError
    from .models.vit import ModelDims
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
    from .io import RecipeError
    from .macs import count_macs, count_params, meta_copy
    from .models import efficientformer as ef
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


def cmd_inspect(args) -> int:
    from .io import load_recipe
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    recipe = load_recipe(args.dir)
    if recipe.get('family') == 'efficientformer':
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


# ------------------------------------------------------------------------------------------------
# finetune

def _task_data(name: str):
    """(x_train, y_train, x_val, y_val, shipped teacher loader) of a --data task."""
    from . import demo
    if name == 'digits':
        return (*demo.digits_data(), demo.load_digits_vit)
    x_tr, y_tr, x_te, y_te = demo.faces_data()
    return demo.faces_crop(x_tr), y_tr, demo.faces_crop(x_te), y_te, demo.load_faces_vit


def cmd_finetune(args) -> int:
    import torch
    import snp_fast
    from .finetune import FinetuneConfig, finetune, init_distributed
    from .io import load_recipe
    from .models.vit import ModelDims, model_dims
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    out = os.path.abspath(args.out or args.dir.rstrip('/') + '_ft')
    ckpt = os.path.abspath(args.checkpoint_dir or out + '.ckpt')
    for flag, path in (('--out', out), ('--checkpoint-dir', ckpt)):  # before any training
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f'{flag} {path}: exists and is not a directory')
        _check_parent(path, flag)
    if not _dir_is_free(out) and not args.overwrite:
        raise UsageError(f'--out {out}: exists and is not empty (pass --overwrite to replace it)')
    if _inside(ckpt, out):
        raise UsageError(f'--checkpoint-dir {ckpt}: inside --out {out}, which the fine-tuned model replaces; '
                         'put the checkpoints elsewhere')
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
    if recipe.get('family', 'vit') != 'vit':
        raise UsageError(f'DIR {args.dir} holds a pruned {recipe["family"]} model; finetune takes the ViT family only')
    x_tr, y_tr, x_val, y_val, shipped = _task_data(args.data)
    if args.limit_train:
        x_tr, y_tr = x_tr[:args.limit_train], y_tr[:args.limit_train]
    if args.limit_val:
        x_val, y_val = x_val[:args.limit_val], y_val[:args.limit_val]
    if args.teacher_weights:
        name = args.teacher or recipe.get('timm_name')
        if not name:
            raise UsageError(f'{args.dir}/recipe.json names no timm model: pass --teacher MODEL')
        kwargs = {**(recipe.get('timm_kwargs') or {}), **_model_kwargs(args.model_kwargs)}
        teacher = _create_model(name, kwargs, device='cpu')
        try:
            load_checkpoint(teacher, args.teacher_weights)
        except UsageError as e:
            raise UsageError(str(e).replace('--checkpoint', '--teacher-weights')) from None
        how = os.path.abspath(args.teacher_weights)
    else:
        for flag, given in (('--teacher', args.teacher), ('--model-kwargs', args.model_kwargs)):
            if given is not None:
                raise UsageError(f'{flag} needs --teacher-weights (the shipped teacher is used without it)')
        teacher, how = shipped(), f'shipped {args.data} ViT'
    try:
        before = ModelDims.from_dict(recipe['dims_before'])
    except (KeyError, TypeError, ValueError) as e:
        raise snp_fast.RecipeError(f'{args.dir}/recipe.json: malformed dims: {e}') from None
    if model_dims(teacher) != before:
        raise UsageError(f'the teacher ({how}) is not the model {args.dir} was pruned from (its widths differ from '
                         'the recipe\'s dims_before); pass the unpruned weights with --teacher-weights')

    rank, world, auto_dev = init_distributed()
    try:
        device = auto_dev if args.device == 'auto' or world > 1 else _resolve_device(args.device)
        student = snp_fast.load_pruned(args.dir)
        from .demo import accuracy
        acc_t, acc_0 = accuracy(teacher, x_val, y_val), accuracy(student, x_val, y_val)
        say = print if rank == 0 else (lambda *a, **k: None)
        say(f'fine-tuning {args.dir} ({recipe.get("timm_name")}) on {args.data}: {len(y_tr)} training images, '
            f'{world} process(es), global batch {cfg.batch_size}, {cfg.epochs} epochs; teacher: {how}')
        res = finetune(student, teacher, x_tr, y_tr, cfg, out=out, overwrite=args.overwrite, checkpoint_dir=ckpt,
                       resume=args.resume, stop_after=args.stop_after, val=(x_val, y_val), device=device,
                       log=lambda m: _log(m) if rank == 0 else None)
        acc_1 = accuracy(res.model.cpu(), x_val, y_val)
        say(f'held-out top-1 ({len(y_val)} images): teacher {acc_t:.2%}, pruned {acc_0:.2%} -> fine-tuned {acc_1:.2%}')
        say(f'wrote {out}/' if res.out else f'stopped at step {res.steps}; continue with --resume (checkpoint {ckpt})')
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return EXIT_OK


# ------------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    import warnings
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)   # argparse exits with status 2 on bad usage
    args.argv = ['snp-fast'] + argv
    from .calib import CalibError
    from .io import RecipeError
    from .models.vit import UnsupportedModelError
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f'warning: {message}\n'  # one line each
    # SIGTERM (timeout, a job scheduler) unwinds like Ctrl-C, so that half-written outputs are removed
    in_main = threading.current_thread() is threading.main_thread()  # (signal handlers: main thread only)
    old_term = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `snp-fast inspect DIR | head`: the reader left; nothing more to say
        sys.stdout = open(os.devnull, 'w')  # noqa: SIM115 -- so that the interpreter's final flush does not raise
        return EXIT_OK
    except (UsageError, CalibError, RecipeError, UnsupportedModelError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError, ValueError) as e:
        _log(f'snp-fast {args.command}: error: {e}')
        return EXIT_USAGE
    except OSError as e:  # disk full and the like: said plainly, no traceback
        _log(f'snp-fast {args.command}: error: {e}')
        return EXIT_ERROR
    except KeyboardInterrupt:
        _log('interrupted')
        return 130
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        _log(f'snp-fast {args.command}: internal error: {type(e).__name__}: {e}')
        return EXIT_ERROR
    finally:
        warnings.formatwarning = old_format
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term is None else old_term)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f'signal {signum}')


if __name__ == '__main__':
    raise SystemExit(main())
