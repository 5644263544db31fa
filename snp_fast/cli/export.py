"""snp-fast export: a pruned model to ONNX, checked against PyTorch with ONNX Runtime."""
import os
import shutil
import tempfile
import time

from ..outputs import first_missing, plan_file
from ._common import EXIT_ERROR, EXIT_OK, UsageError, log


def run(args) -> int:
    """`snp-fast export DIR --onnx OUT`: export, check with ONNX Runtime, then move into place; the exit status."""
    import snp_fast
    from ..export import MAX_OPSET, check_onnx, export_onnx
    if not os.path.isdir(args.dir):
        raise UsageError(f'DIR {args.dir}: no such directory')
    if not 17 <= args.opset <= MAX_OPSET:
        raise UsageError(f'--opset must be in [17, {MAX_OPSET}], got {args.opset}')
    if not args.tol >= 0:
        raise UsageError(f'--tol must be a number >= 0, got {args.tol}')
    out = plan_file(args.onnx, '--onnx', overwrite=args.overwrite, inputs=[('DIR', args.dir)])
    model = snp_fast.load_pruned(args.dir)
    # exported and checked beside the destination, then renamed over it: a failed check leaves what was there
    made = first_missing(out)  # the outermost folder this export creates, removed again if it fails
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
            log(f'error: ONNX check failed (max abs diff {diff:.3g} > {args.tol:g}); {out} not written')
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
