"""Coverage sweep: which timm models snp_fast prunes, which it refuses (and why), which crash.

    python -m research.sweep                                   # vit_*, deit*, efficientformer* -> COVERAGE.md
    python -m research.sweep --pattern 'deit*' --limit 5 --out /tmp/cov.md

A research harness, run from the repository root; it is not installed with snp_fast and uses only its public API
(snp_fast.prune, save_pruned, load_pruned, UnsupportedModelError) and the family registry's supported-structure texts.

For each model name (timm.list_models, pretrained=False; no weights are downloaded):

1. build it with depth=2 and a small img_size (the smallest multiple of its patch stride >= 64), falling
   back to timm's default size, then to timm's defaults, when a kwarg is rejected or the model does
   not run at that size. The sweep covers STRUCTURE (block, attention, MLP, token, norm and head
   types), not size: a 2-block model has the same layer types as the full-depth one;
2. prune it with snp_fast.prune on 2 random calibration images at {'qk': .25, 'v': .25, 'mlp': .25,
   'embed': .125} (qk_norm and RoPE models refuse q/k pruning: they are re-tried with qk=0, recorded);
3. run the pruned model (the output must have the original's shape and be finite);
4. save_pruned / load_pruned through a temporary directory; the loaded model's output must equal the
   pruned model's exactly.

Status: ``ok`` (a note says when q/k was kept whole, or when a headless model's output width shrank);
``refused`` (snp_fast's UnsupportedModelError, or a ValueError / NotImplementedError
naming an unsupported feature: expected for families snp_fast does not cover); ``FAILED`` (any other
exception, or a check above that does not hold: the thing this sweep is for); ``timeout``; ``skipped``
(too large to materialise even at depth=2, e.g. a model whose per-block kwargs reject depth=2, and not
refused by snp_fast.prune on its meta-device build).

Time limit: `timeout` seconds (default 60) for a model of up to REF_PARAMS = 25M parameters as built, and
``timeout * params / REF_PARAMS`` above that (model_time_limit): one limit for every model would either cut
the largest ones or let a hung small one run for many minutes. Measured on the 2-core CPU box, 1 thread, load
average ~5 (`sweep_model(name, timeout=None)`): vit_giant_patch14_dinov2 (57.6M parameters at depth=2) 36 s,
vit_7b_patch16_dinov3 (339M) 154 s: the time grows about linearly with the parameters (x4.3 for x5.9), at
about 0.5-0.65 s per million parameters under that load. The rule gives them 138 s and 813 s (3.8x and 5.3x
the measured time), and 60 s to every model of up to 25M (>= 15 s measured at that rate: 4x). The build itself
runs under the base limit; the scaled one counts from the same start and applies once the model's size is known.

In the command each model runs in a worker process with a per-model time limit (signal.alarm inside
the worker, and a hard kill from the parent if a long native op ignores the alarm); a worker that dies
is replaced and its model recorded as FAILED, and one whose model timed out is replaced too (the alarm
may have interrupted an import and left the process unusable).
"""
import argparse
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import snp_fast

__all__ = ['DEFAULT_PATTERNS', 'DEFAULT_RATIOS', 'SweepResult', 'list_sweep_models', 'sweep_model', 'run_sweep',
           'render_markdown', 'main']

DEFAULT_PATTERNS = ('vit_*', 'deit*', 'efficientformer*')
DEFAULT_RATIOS = {'qk': .25, 'v': .25, 'mlp': .25, 'embed': .125}
DEPTH = 2
MIN_IMG = 64
CALIB_IMAGES = 2
REF_PARAMS = 25_000_000        # models up to this size (as built) get the base time limit; larger: x n / REF
KILL_GRACE = 30.0              # seconds past a model's limit before run_sweep kills a worker that ignored the alarm
MAX_BUILD_PARAMS = 400_000_000  # never materialise a model larger than this (fp32: 1.6 GB)
WIDTH_NOTE = 'no classifier head (num_classes=0), so embedding pruning changes the output feature width'
REFUSAL_RE = re.compile(r'not supported|unsupported|cannot be pruned|not implemented', re.I)


class SweepTimeout(BaseException):
    """One model ran past the sweep's per-model time limit. A BaseException (as KeyboardInterrupt): the
    `except Exception` of the sweep's own probes, timm's and torch's must not swallow it."""


class SweepSkip(Exception):
    """One model cannot be swept on this machine (too large to build even at depth=2)."""


@dataclass
class SweepResult:
    name: str
    status: str                      # 'ok' | 'refused' | 'FAILED' | 'timeout'
    detail: str = ''                 # refusal reason, exception, or a note on an ok model
    phase: str = ''                  # where it stopped: build | prune | forward | save | load | compare
    where: str = ''                  # innermost snp_fast frame of an unexpected exception (file:line)
    build_kwargs: Dict = field(default_factory=dict)
    time_limit: Optional[float] = None  # seconds this model was allowed (model_time_limit of its built size)
    params_before: Optional[int] = None
    params_after: Optional[int] = None
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def list_sweep_models(patterns: Sequence[str] = DEFAULT_PATTERNS) -> List[str]:
    import timm
    names = set()
    for p in patterns:
        names.update(timm.list_models(p))
    return sorted(names)


# ------------------------------------------------------------------------------------------------
# one model

def model_time_limit(timeout: Optional[float], n_params: int) -> Optional[float]:
    """Seconds a model of `n_params` parameters (as built) gets: `timeout` up to REF_PARAMS, then
    timeout * n_params / REF_PARAMS (measured in the module docstring). None / 0 (no limit) stays so."""
    if not timeout:
        return timeout
    return float(timeout) * max(1.0, n_params / REF_PARAMS)


class _Alarm:
    """A wall-clock limit by signal.setitimer (main thread only; elsewhere, or without SIGALRM, no limit is enforced).

    `extend(total)` raises the limit to `total` seconds counted from the start, once a model's size is known."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.active = bool(seconds and seconds > 0 and hasattr(signal, 'SIGALRM')
                           and threading.current_thread() is threading.main_thread())

    def _raise(self, signum, frame):
        raise SweepTimeout(f'over the {self.seconds:g} s limit')

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.active:
            self.old = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds))
        return self

    def extend(self, total: Optional[float]) -> None:
        if not self.active or not total or total <= self.seconds:
            return
        self.seconds = float(total)
        left = self.seconds - (time.perf_counter() - self.t0)
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3))

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


def _short(msg: str, limit: int = 300) -> str:
    from snp_fast.families import families, vit
    everything = '; '.join(f.supported for f in families())  # family_of's refusal names every family
    msg = str(msg).replace(f'; snp_fast prunes {everything}', '')
    msg = msg.replace(f'; snp_fast prunes {vit.SUPPORTED}', '').replace(f' ({vit.SUPPORTED})', '')
    msg = ' '.join(msg.split())
    return msg if len(msg) <= limit else msg[:limit - 3] + '...'


def _snp_frame(exc: BaseException) -> str:
    """file:line of the innermost traceback frame inside the snp_fast package (else the innermost frame)."""
    pkg = os.path.dirname(os.path.abspath(snp_fast.__file__))
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(pkg + os.sep)
            and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    f = (ours or frames or [None])[-1]
    if f is None:
        return ''
    path = os.path.relpath(f.filename, os.path.dirname(pkg)) if ours else f.filename
    return f'{path}:{f.lineno} ({f.name})'


def _stride(model) -> Optional[int]:
    pe = getattr(model, 'patch_embed', None)
    img, grid = getattr(pe, 'img_size', None), getattr(pe, 'grid_size', None)
    try:
        return int(img[0]) // int(grid[0]) if img and grid and int(grid[0]) > 0 else None
    except (TypeError, ValueError, IndexError):
        return None


def _input_size(model) -> tuple:
    pe = getattr(model, 'patch_embed', None)
    img = getattr(pe, 'img_size', None)
    chans = getattr(model, 'in_chans', None) or (getattr(model, 'pretrained_cfg', None) or {}).get(
        'input_size', (3,))[0]
    if img is None:
        img = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))[1:]
    if isinstance(img, int):
        img = (img, img)
    return (int(chans), int(img[0]), int(img[1]))


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _candidates(name: str, depth: int, min_img: int, extra: Optional[dict] = None) -> List[tuple]:
    """[(timm kwargs, meta-device model or None)], smallest first: depth + small img_size, depth alone, nothing."""
    import timm

    def meta(kw):
        try:
            return timm.create_model(name, pretrained=False, device='meta', **kw, **(extra or {}))
        except Exception:  # noqa: BLE001 -- timm rejects these kwargs (or cannot build on meta)
            return None

    base = {'depth': depth}
    first = meta(base)
    if first is None:  # per-block kwargs (Sapiens2's num_kv_heads) reject a bare depth: one block of each kind
        kv = [getattr(b.attn, 'num_kv_heads', None) for b in getattr(meta({}), 'blocks', [])]
        if kv and None not in kv:
            kinds = list(dict.fromkeys(kv))
            base = {'depth': depth, 'num_kv_heads': [kinds[min(i, len(kinds) - 1)] for i in range(depth)]}
            first = meta(base)
    stride = _stride(first) if first is not None else None
    if stride is None:
        m = re.search(r'patch(\d+)', name)
        stride = int(m.group(1)) if m else None
    cands = []
    if stride:
        kw = dict(base, img_size=math.ceil(min_img / stride) * stride)
        cands.append((kw, meta(kw)))
    cands += [(base, first), ({}, meta({}))]
    if name.startswith('efficientformer_'):  # V1 takes per-stage `depths`: one block per stage, `depth` in the last
        kw = {'depths': [1, 1, 1, depth]}
        cands.insert(0, (kw, meta(kw)))
    return cands


def _refuse_on_meta(meta, ratios: dict) -> None:
    """Raise snp_fast's UnsupportedModelError for an unsupported structure, from the meta-device build (no data)."""
    try:
        snp_fast.prune(meta, None, ratios)  # refuses an unsupported structure before touching data
    except snp_fast.UnsupportedModelError:
        raise
    except Exception:  # noqa: BLE001 -- supported structure (it asked for data): the caller goes on
        pass


def _build(name: str, depth: int, min_img: int, seed: int, ratios: dict, extra: Optional[dict] = None):
    """(model in eval mode, its kwargs, calibration images, its output on them) at the smallest kwargs that work.

    A candidate whose meta-device build has more than MAX_BUILD_PARAMS parameters (e.g. a model that rejects
    depth=2) is not materialised: snp_fast.prune is called on the meta model without data, which refuses
    an unsupported structure before it needs any; otherwise the model is skipped as too large. The same
    check runs before any full-depth build (a model whose kwargs reject depth=2, e.g. per-block num_kv_heads).
    """
    import timm
    import torch
    errors, too_big = [], None
    for kw, meta in _candidates(name, depth, min_img, extra):
        kw = dict(kw, **(extra or {}))
        if meta is not None and _n_params(meta) > MAX_BUILD_PARAMS:
            too_big = too_big or (kw, meta)
            errors.append(f'{kw}: {_n_params(meta) / 1e9:.2f}B parameters, over the {MAX_BUILD_PARAMS / 1e6:.0f}M '
                          'build limit')
            continue
        if meta is not None and 'depth' not in kw and 'depths' not in kw:
            _refuse_on_meta(meta, ratios)  # a full-depth build is only worth its minutes if snp_fast would prune it
        try:
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kw).eval()
            g = torch.Generator().manual_seed(seed)
            calib = torch.randn(CALIB_IMAGES, *_input_size(model), generator=g)
            with torch.no_grad():
                y0 = model(calib)
            return model, kw, calib, y0
        except Exception as e:  # noqa: BLE001 -- timm rejected these kwargs: try the next (SweepTimeout passes)
            errors.append(f'{kw}: {type(e).__name__}: {_short(e, 160)}')
    if too_big is not None:
        _refuse_on_meta(too_big[1], ratios)
        raise SweepSkip('too large to build on this machine (' + '; '.join(errors) + ')')
    raise RuntimeError('timm could not build and run the unpruned model: ' + ' | '.join(errors))


def sweep_model(name: str, ratios: Optional[dict] = None, timeout: Optional[float] = 60.0, depth: int = DEPTH,
                min_img: int = MIN_IMG, seed: int = 0, timm_kwargs: Optional[dict] = None,
                on_limit: Optional[Callable[[float], None]] = None) -> SweepResult:
    """Build, prune, run and save/load one timm model; never raises (except KeyboardInterrupt).

    timeout: the base time limit in seconds, scaled by model_time_limit once the model is built (None: none).
    timm_kwargs: extra timm.create_model kwargs (e.g. {'qk_norm': True}) added to every build attempt.
    on_limit: called with the scaled limit (seconds from the start) once it is known (run_sweep's worker tells
        the parent, whose hard kill then waits that long).
    """
    t0 = time.perf_counter()
    res = SweepResult(name, 'ok', time_limit=timeout)
    try:
        with _Alarm(timeout) as alarm:
            def limit(n_params):
                res.time_limit = model_time_limit(timeout, n_params)
                alarm.extend(res.time_limit)
                if on_limit is not None and res.time_limit:
                    on_limit(res.time_limit)
            _sweep_model(res, dict(ratios or DEFAULT_RATIOS), depth, min_img, seed, timm_kwargs, limit)
    except SweepTimeout as e:
        res.status, res.detail = 'timeout', f'{e} (during {res.phase})'
    except SweepSkip as e:
        res.status, res.detail = 'skipped', _short(e, 400)
    except Exception as e:  # noqa: BLE001 -- classify everything: refusals are expected, the rest is the finding
        refusal = isinstance(e, snp_fast.UnsupportedModelError) or (
            isinstance(e, (ValueError, NotImplementedError)) and REFUSAL_RE.search(str(e)) and res.phase == 'prune')
        if refusal:
            res.status, res.detail = 'refused', _short(e)
        else:
            res.status, res.detail = 'FAILED', f'{type(e).__name__}: {_short(e, 400)}'
            res.where = _snp_frame(e)
    res.seconds = time.perf_counter() - t0
    return res


def _sweep_model(res: SweepResult, ratios: dict, depth: int, min_img: int, seed: int,
                 extra: Optional[dict], limit: Callable[[int], None]) -> None:
    import torch

    res.phase = 'build'
    model, res.build_kwargs, calib, y0 = _build(res.name, depth, min_img, seed, ratios, extra)
    limit(_n_params(model))

    res.phase = 'prune'
    try:
        pruned, report = snp_fast.prune(model, calib, ratios)
    except ValueError as e:
        if 'q/k dims cannot be pruned' not in str(e) or not ratios.get('qk'):
            raise
        ratios = dict(ratios, qk=0.0)
        pruned, report = snp_fast.prune(model, calib, ratios)
        why = 'RoPE' if 'RoPE' in str(e) else 'qk_norm'
        res.detail = f'qk=0 ({why} model: q/k dims cannot be pruned)'
    res.params_before, res.params_after = report.params_before, report.params_after
    res.macs_before, res.macs_after = report.macs_before, report.macs_after
    pruned.eval()

    res.phase = 'forward'
    with torch.no_grad():
        y = pruned(calib)
    if tuple(y.shape) != tuple(y0.shape):
        headless = getattr(model, 'num_classes', None) == 0 and y0.dim() == 2 and y.dim() == 2 \
            and y0.shape[1] == report.dims_before.embed and y.shape[1] == report.dims_after.embed
        if not headless:
            raise AssertionError(f'pruned output shape {tuple(y.shape)} != original {tuple(y0.shape)}')
        res.detail = '; '.join(filter(None, [res.detail, f'{WIDTH_NOTE}: {y0.shape[1]} → {y.shape[1]}']))
    if not torch.isfinite(y).all():
        raise AssertionError('pruned output has NaN/Inf')
    if res.params_after >= res.params_before:
        res.detail = '; '.join(filter(None, [res.detail, 'parameter count did not shrink']))

    with tempfile.TemporaryDirectory(prefix='snp_sweep_') as tmp:
        res.phase = 'save'
        snp_fast.save_pruned(pruned, os.path.join(tmp, 'm'))
        res.phase = 'load'
        loaded = snp_fast.load_pruned(os.path.join(tmp, 'm'))
    res.phase = 'compare'
    with torch.no_grad():
        y2 = loaded(calib)
    if tuple(y2.shape) != tuple(y.shape) or not torch.equal(y2, y):
        diff = (y2 - y).abs().max().item() if y2.shape == y.shape else float('nan')
        raise AssertionError(f'loaded model output differs from the pruned model (max abs diff {diff:.3g}, '
                             f'shapes {tuple(y2.shape)} vs {tuple(y.shape)})')
    res.phase = 'done'


# ------------------------------------------------------------------------------------------------
# many models: a worker process per run, replaced when it hangs or dies

def _worker(jobs, results, timeout, threads, depth, min_img):
    import torch
    torch.set_num_threads(threads)
    import warnings
    warnings.filterwarnings('ignore')
    while True:
        name = jobs.get()
        if name is None:
            return
        r = sweep_model(name, timeout=timeout, depth=depth, min_img=min_img,
                        on_limit=lambda s: results.put({'limit_s': s}))
        results.put(r.to_dict())


def run_sweep(names: Iterable[str], timeout: float = 60.0, threads: int = 1, isolate: bool = True,
              depth: int = DEPTH, min_img: int = MIN_IMG, log=None) -> List[SweepResult]:
    """sweep_model over `names`; with isolate=True in a worker process that is killed KILL_GRACE s past the model's
    time limit (model_time_limit: the worker reports it once the model is built) and replaced after any timeout."""
    names = list(names)
    out: List[SweepResult] = []

    def emit(i, r):
        out.append(r)
        if log:
            log(f'[{i + 1}/{len(names)}] {r.name}: {r.status} {r.detail[:120]} ({r.seconds:.1f}s)')

    if not isolate:
        import torch
        torch.set_num_threads(threads)
        for i, n in enumerate(names):
            emit(i, sweep_model(n, timeout=timeout, depth=depth, min_img=min_img))
        return out

    import multiprocessing as mp
    import queue as _queue
    ctx = mp.get_context('spawn')
    proc = jobs = results = None

    def start():
        nonlocal proc, jobs, results
        jobs, results = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_worker, args=(jobs, results, timeout, threads, depth, min_img), daemon=True)
        proc.start()

    def stop(kill):
        if proc is None:
            return
        if kill:
            proc.kill()
        proc.join(10)

    try:
        for i, n in enumerate(names):
            if proc is None or not proc.is_alive():
                start()
            jobs.put(n)
            t0 = time.perf_counter()
            hard = (timeout + KILL_GRACE) if timeout else None
            r = None
            while r is None:
                try:
                    msg = results.get(timeout=1.0)
                    if 'limit_s' in msg:  # the worker built the model: its scaled limit
                        hard = msg['limit_s'] + KILL_GRACE
                        continue
                    r = SweepResult(**msg)
                except _queue.Empty:
                    el = time.perf_counter() - t0
                    if not proc.is_alive():
                        r = SweepResult(n, 'FAILED', f'worker process died (exit code {proc.exitcode})',
                                        seconds=el)
                    elif hard and el > hard:
                        stop(kill=True)
                        r = SweepResult(n, 'timeout', f'killed after {el:.0f} s (a native op ignored the alarm)',
                                        seconds=el)
            if r.status == 'timeout' and proc is not None:
                # the alarm can land inside an import (torch imports sympy lazily) and leave a half-initialised
                # module behind that fails every later model: the next one gets a fresh worker
                stop(kill=True)
            if proc is not None and not proc.is_alive():
                proc = None
            emit(i, r)
        if proc is not None and proc.is_alive():
            jobs.put(None)
            stop(kill=False)
    finally:
        if proc is not None and proc.is_alive():
            stop(kill=True)
    return out


# ------------------------------------------------------------------------------------------------
# report

def _num(x: Optional[int], unit: float, suffix: str) -> str:
    if x is None:
        return '–'
    v = x / unit
    return f'{v:.3g}{suffix}' if v < 1000 else f'{v:.0f}{suffix}'


def _pair(a, b, unit, suffix) -> str:
    if a is None:
        return ''
    if b is None:
        return _num(a, unit, suffix)
    return f'{_num(a, unit, suffix)} → {_num(b, unit, suffix)} ({b / a:.0%})'


def _group_key(detail: str) -> str:
    return re.sub(r'blocks\.\d+', 'blocks.N', detail)


def render_markdown(results: Sequence[SweepResult], patterns: Sequence[str], ratios: dict = DEFAULT_RATIOS,
                    timeout: float = 60.0, depth: int = DEPTH, min_img: int = MIN_IMG,
                    elapsed: Optional[float] = None) -> str:
    import timm
    import torch
    from snp_fast import __version__
    from snp_fast.families import families
    n = len(results)
    c = Counter(r.status for r in results)
    ok = c['ok']
    share = ok / n if n else 0.0
    L = ['# snp_fast coverage of timm models', '',
         f'Generated by `python -m research.sweep` (snp_fast {__version__}, timm {timm.__version__}, '
         f'torch {torch.__version__}, CPU). Models: '
         + ', '.join(f'`{p}`' for p in patterns) + f' (timm.list_models patterns / names), pretrained=False '
         f'({n} models).', '',
         '**What is covered is structure, not size.** Every model is built with '
         f'`depth={depth}` and, where timm accepts it, the smallest `img_size` that is a multiple of its patch '
         f'stride and ≥ {min_img} (else its default size), with random weights. Block, attention, MLP, token '
         '(cls / distillation / register), norm, pooling and head types are those of the full model; the '
         'parameter and MAC counts below are of these 2-block, small-image builds, NOT of the released models.', '',
         f'Per model: `snp_fast.prune(model, calib, {ratios})` with {CALIB_IMAGES} random calibration images of '
         'the model\'s input size (default criteria, re-fit on); qk_norm and RoPE models refuse q/k pruning and are '
         're-tried with qk=0 (noted). Then a forward of the pruned model (same output shape as the original, '
         'finite), and `save_pruned` → `load_pruned` through a temporary directory, whose output must equal the '
         f'pruned model\'s exactly (`torch.equal`). Time limit {timeout:g} s per model of up to '
         f'{REF_PARAMS / 1e6:.0f}M parameters (as built), × parameters / {REF_PARAMS / 1e6:.0f}M above that (the '
         'time grows about linearly with the parameters; research/sweep.py has the measurement).', '',
         'Supported families: ' + '; '.join(f.supported for f in families()) + '.', '',
         '## Summary', '',
         f'- **{ok} / {n} pruned and running ({share:.1%})**' + (' — meets' if share >= 0.9 else ' — below')
         + ' the issue\'s 90 % target',
         f'- ok: {ok} (of which q/k kept whole for qk_norm / RoPE: '
         f'{sum(1 for r in results if r.status == "ok" and r.detail.startswith("qk=0"))})',
         f'- refused (with a reason): {c["refused"]}',
         f'- FAILED (crash / wrong result): {c["FAILED"]}',
         f'- timeout: {c["timeout"]}',
         f'- skipped (too large to build here even at depth={depth}, structure not refused): {c["skipped"]}']
    widened = [r.name for r in results if r.status == 'ok' and WIDTH_NOTE in r.detail]
    if widened:
        L.append(f'- of the ok models, {len(widened)} have no classifier head (num_classes=0): their output is the '
                 'final-norm feature vector, whose width shrinks with the embedding ratio (not a drop-in '
                 'replacement for a feature extractor)')
    if elapsed is not None:
        L.append(f'- sweep wall time: {elapsed / 60:.1f} min')
    L.append('')
    refused = Counter(_group_key(r.detail) for r in results if r.status == 'refused')
    if refused:
        L += ['### Refusal reasons', '', '| count | reason (snp_fast\'s message) |', '|---:|---|']
        L += [f'| {k} | {reason.replace("|", "/")} |' for reason, k in refused.most_common()]
        L.append('')
    bad = [r for r in results if r.status in ('FAILED', 'timeout', 'skipped')]
    if bad:
        L += ['### Failures, timeouts and skips', '']
        L += [f'- `{r.name}` ({r.status}, during {r.phase or "?"}): {r.detail}'
              + (f' — at `{r.where}`' if r.where else '') for r in bad]
        L.append('')
    L += ['## Per model', '',
          '`built with`: the timm kwargs the model was built with (a fallback to a larger set means '
          'timm rejected the smaller one).', '',
          '| model | status | params before → after | MACs before → after | s | built with |',
          '|---|---|---|---|---:|---|']
    for r in results:
        st = r.status if not r.detail else f'{r.status}: {r.detail}'
        L.append(f'| `{r.name}` | {st.replace("|", "/")} | {_pair(r.params_before, r.params_after, 1e6, "M")} | '
                 f'{_pair(r.macs_before, r.macs_after, 1e9, "G")} | {r.seconds:.1f} | '
                 + ', '.join(f'{k}={v}' for k, v in r.build_kwargs.items()) + ' |')
    return '\n'.join(L) + '\n'


# ------------------------------------------------------------------------------------------------
# command line

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='python -m research.sweep', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--pattern', action='append', default=None,
                    help=f'timm.list_models pattern (repeatable; default {" ".join(DEFAULT_PATTERNS)})')
    ap.add_argument('--model', action='append', default=None, help='an exact model name (repeatable)')
    ap.add_argument('--limit', type=int, default=None, help='only the first N names (sorted)')
    ap.add_argument('--out', default='COVERAGE.md', help='markdown report (default COVERAGE.md)')
    ap.add_argument('--timeout', type=float, default=60.0,
                    help=f'seconds per model of up to {REF_PARAMS / 1e6:.0f}M parameters as built, '
                    f'x params / {REF_PARAMS / 1e6:.0f}M above (default 60)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    ap.add_argument('--no-isolate', action='store_true', help='run in this process (no worker process)')
    a = ap.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        ap.error('--limit must be >= 1')
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if os.path.isdir(a.out) or not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        ap.error(f'--out {a.out}: ' + ('is a folder' if os.path.isdir(a.out) else f'cannot write into {out_dir}')
                 + ' (checked before the sweep, which can take hours)')
    import timm
    unknown = [n for n in a.model or [] if not timm.is_model(n)]
    if unknown:
        ap.error(f'--model: not a timm model name: {", ".join(unknown)}')
    patterns = a.pattern or ([] if a.model else list(DEFAULT_PATTERNS))
    names = sorted(set(list_sweep_models(patterns) if patterns else []) | set(a.model or []))
    if a.limit:
        names = names[:a.limit]
    if not names:
        ap.error(f'no timm model matches {patterns}')
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f'sweeping {len(names)} models -> {a.out}')
    t0 = time.perf_counter()
    results = run_sweep(names, timeout=a.timeout, threads=a.threads, isolate=not a.no_isolate, log=log)
    md = render_markdown(results, patterns + list(a.model or []), timeout=a.timeout,
                         elapsed=time.perf_counter() - t0)
    tmp = a.out + '.tmp'
    with open(tmp, 'w') as f:
        f.write(md)
    os.replace(tmp, a.out)
    c = Counter(r.status for r in results)
    log(f'ok {c["ok"]}, refused {c["refused"]}, FAILED {c["FAILED"]}, timeout {c["timeout"]}, skipped {c["skipped"]} '
        f'of {len(results)} '
        f'-> {a.out}')
    return 1 if c['FAILED'] else 0


if __name__ == '__main__':
    raise SystemExit(main())
