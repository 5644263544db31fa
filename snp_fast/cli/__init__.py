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

Layout: _parser (the options of every subcommand), one module per subcommand (prune, bench, export,
inspect, finetune: each a `run(args) -> exit status`), _common (exit codes, UsageError, logging, device,
model building and weights, the family look-up), _ratios (the pruning targets shared by prune and bench).
Library logic lives in the library: snp_fast.weights (models and weights), snp_fast.outputs (where a
command may write).
"""
import os
import signal
import sys
import threading
import traceback
from typing import List, Optional

from ._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError, log
from ._parser import build_parser

__all__ = ['main', 'build_parser', 'UsageError']


def main(argv: Optional[List[str]] = None) -> int:
    """Run one snp-fast command (`argv` without the program name; default sys.argv[1:]); the exit status."""
    import warnings
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)   # argparse exits with status 2 on bad usage
    args.argv = ['snp-fast'] + argv
    from ..calib import CalibError
    from ..io import RecipeError
    from ..families import UnsupportedModelError
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
        log(f'snp-fast {args.command}: error: {e}')
        return EXIT_USAGE
    except OSError as e:  # disk full and the like: said plainly, no traceback
        log(f'snp-fast {args.command}: error: {e}')
        return EXIT_ERROR
    except KeyboardInterrupt:
        log('interrupted')
        return 130
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        log(f'snp-fast {args.command}: internal error: {type(e).__name__}: {e}')
        return EXIT_ERROR
    finally:
        warnings.formatwarning = old_format
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old_term is None else old_term)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f'signal {signum}')

