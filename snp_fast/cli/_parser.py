"""The argument parser of snp-fast: every subcommand's options and help."""
import argparse
import textwrap
from typing import List

from . import bench as bench_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import finetune as finetune_cmd
from . import inspect as inspect_cmd
from . import prune as prune_cmd

DESCRIPTION = 'snp-fast: SNP structured pruning of timm vision transformers from the command line.'
OVERWRITE_HELP = ('replace an existing --out model folder (atomically; refused when it holds other files, an input '
                  'of this command, or the current directory)')

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
    from .. import __version__
    ap = argparse.ArgumentParser(prog='snp-fast', description=DESCRIPTION,
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
    p.add_argument('--num-calib', type=int, default=64, metavar='N',
                   help='calibration images to use (default 64); they are held in memory together: more than '
                        'fit in a quarter of the available memory (snp_fast.calib.MEMORY_SHARE; about 0.6 MB per '
                        '224px image) is refused (exit 2) after the first image, before the rest are built')
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument('--preset', metavar='NAME', help='the authors\' per-block ratios; one of: ' + ', '.join(_presets()))
    t.add_argument('--ratios', metavar='FILE.json', help='ratios (fraction REMOVED), a JSON file or inline JSON: a number, '
                   '{"qk","v","mlp","embed"} or {"blocks": [{"qk","v","mlp"}, ...], "embed"}')
    t.add_argument('--flops', metavar='MACS', help='target MACs per image, e.g. 2.0G (automatic allocation, see below)')
    t.add_argument('--params', metavar='N', help='target parameter count, e.g. 10M (automatic allocation)')
    p.add_argument('--round-to', type=int, default=1, metavar='N', help='keep widths multiples of N where possible')
    p.add_argument('--out', metavar='DIR', help='output directory (default: ./MODEL_snp); must not exist or be empty')
    p.add_argument('--overwrite', action='store_true', help=OVERWRITE_HELP)
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    p.add_argument('--backend', default='auto',
                   help='kernels to prefer: auto | reference | compiled | triton (each op on it where it has it)')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                   help='precision of the redundancy cosines and re-fit Grams: fp32 (default, the pure-Python '
                   "version's selection) or bf16 (faster on CPUs with AMX / AVX512-BF16; near-tied filters may swap)")
    p.add_argument('--batch-size', type=int, default=32, metavar='N', help='images per chunk while pruning')
    p.add_argument('--no-refit', action='store_true', help='skip the least-squares re-fit (SNP selection only)')
    p.add_argument('--plot', action='store_true',
                   help='also write attention.png: CLS attention maps, original vs pruned, on one calibration image')
    p.add_argument('--seed', type=int, default=0, help='seed for the choice of calibration images')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.set_defaults(func=prune_cmd.run)

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
    p.add_argument('--json', metavar='FILE', help='also write the rows as JSON (never over the pruned DIR\'s files)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --json FILE')
    p.add_argument('--quiet', action='store_true')
    p.set_defaults(func=bench_cmd.run)

    p = sub.add_parser('export', help='export a pruned model to ONNX and check it with ONNX Runtime',
                       description='Export a directory written by "prune" to ONNX (opset >= 17, dynamic batch) and '
                                   'check it with ONNX Runtime on a random input: exit 1 if the max abs difference '
                                   'from PyTorch exceeds --tol.')
    p.add_argument('dir', metavar='DIR')
    p.add_argument('--onnx', required=True, metavar='OUT.onnx')
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--tol', type=float, default=1e-4, help='max abs difference allowed (default 1e-4)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --onnx file (never one of DIR\'s files)')
    p.set_defaults(func=export_cmd.run)

    p = sub.add_parser('eval', help='top-1 / top-5 / loss / images/s on an image folder (timm preprocessing)',
                       description='Evaluate a pruned folder (with the preprocessing its recipe recorded from the '
                                   'original model) or a timm model (--checkpoint / --pretrained) on an ImageFolder '
                                   'tree (one sub-folder per class, sorted = class index, as timm and torchvision). '
                                   'Images stream through timm\'s evaluation transform; unreadable files are skipped '
                                   'and counted.')
    p.add_argument('target', metavar='TARGET', help='a folder written by "prune" / "finetune", or a timm model name')
    p.add_argument('--data', required=True, metavar='DIR', help='ImageFolder tree to evaluate on')
    p.add_argument('--checkpoint', metavar='PATH', help='weights for a timm TARGET (.safetensors or a state dict)')
    p.add_argument('--pretrained', action='store_true', help='timm hub weights for a timm TARGET')
    _add_model_args(p)
    p.add_argument('--img-size', type=int, metavar='N', help='input size (default: the model\'s data config)')
    p.add_argument('--mean', type=float, nargs='+', metavar='M', help='normalisation mean per channel')
    p.add_argument('--std', type=float, nargs='+', metavar='S', help='normalisation std per channel')
    p.add_argument('--interpolation', choices=['bilinear', 'bicubic', 'nearest'], help='resize interpolation')
    p.add_argument('--crop-pct', type=float, metavar='F', help='center-crop fraction (timm\'s crop_pct)')
    p.add_argument('-b', '--batch-size', type=int, default=64, metavar='N', help='images per batch (default 64)')
    p.add_argument('-j', '--workers', type=int, default=2, metavar='N', help='data-loading processes (default 2)')
    p.add_argument('--device', default='auto', help='cpu, cuda, cuda:1, ... (default: cuda if available)')
    p.add_argument('--json', metavar='FILE', help='also write the result as JSON')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=eval_cmd.run)

    p = sub.add_parser('inspect', help='print the recipe of a pruned model and its sizes',
                       description='Print what a directory written by "prune" holds: the architecture, widths '
                                   'before/after per block, parameters, MACs, settings, file sizes.')
    p.add_argument('dir', metavar='DIR')
    p.set_defaults(func=inspect_cmd.run)

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
    p.add_argument('--overwrite', action='store_true', help=OVERWRITE_HELP)
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
    p.set_defaults(func=finetune_cmd.run)
    return ap


def _presets() -> List[str]:
    from ..presets import list_presets
    try:
        return list_presets()
    except Exception:  # noqa: BLE001 -- help text only
        return []
