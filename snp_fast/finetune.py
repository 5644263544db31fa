"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned teacher.

    result = finetune(student, teacher, x_train, y_train, FinetuneConfig(epochs=5), out='out/ft')
    torchrun --nproc_per_node 2 -m snp_fast finetune out/pruned --data digits --out out/ft

Loss (Hinton et al. 2015): α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y), with t the teacher's
and s the student's logits. AdamW, learning rate warmed up linearly then cosine-decayed to 0, per step.
AMP autocast on CUDA only (bf16 where supported, else fp16 with a GradScaler); CPU runs in float32.

Distributed: under `torchrun` (WORLD_SIZE > 1) the student is wrapped in DistributedDataParallel (nccl on
CUDA, gloo on CPU) and each rank reads its share of every global batch through a DistributedSampler.
`batch_size` is the GLOBAL batch: each of W ranks takes batch_size / W images, DDP averages the gradients,
so a W-process run follows the same trajectory as a 1-process run (to float rounding; tested).
Only rank 0 writes files; every write is followed by a collective that tells all ranks whether it worked,
so a failed write raises on every rank instead of leaving the others waiting.

Checkpoints (no pickle): CKPT/checkpoint-<step>.safetensors holds the student's weights ("model.*") and the
optimizer state tensors flattened ("optim.<param index>.<key>"); CKPT/checkpoint.json names that file and
holds the step, epoch, config, seed, AdamW param-group settings, GradScaler scalars and the loss of the
epoch so far; its rename is what commits a checkpoint. The data order is a function of
(seed, epoch) and the learning rate a function of the step, so resuming from a checkpoint gives the same
final weights as an uninterrupted run (tested). The final model is written with snp_fast.save_pruned
(load_pruned reads it), its recipe extended with a "finetune" entry.

Reliability: the weights and AdamW moments are checked after every update; a NaN/Inf stops the run with
NonFiniteError naming the step, before any model or checkpoint holding it is written, so the last checkpoint
is the last finite one. Checkpointing removes or replaces only files it wrote (the JSON, and the weights file
the previous JSON named; a crashed write's weights file of the same step, marked as snp_fast's in its header):
a user's checkpoint-best.safetensors beside them is never touched. A fresh run refuses a folder that holds an
earlier checkpoint unless resume=True or overwrite=True. Resuming checks every field of the checkpoint before
the model or optimizer is changed: a truncated file, a garbled field, NaN/Inf are CheckpointError.
"""
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CKPT_STATE, CheckpointError, NonFiniteError, committed, first_non_finite, load_checkpoint,
                         save_checkpoint, weights_and_moments)

__all__ = ['FinetuneConfig', 'FinetuneResult', 'kd_loss', 'lr_factor', 'finetune', 'init_distributed',
           'save_checkpoint', 'load_checkpoint', 'CheckpointError', 'NonFiniteError']


@dataclass
class FinetuneConfig:
    """Args:
        epochs: passes over the training set.
        batch_size: GLOBAL images per optimizer step (split evenly over the ranks).
        lr: peak learning rate (AdamW), reached after the warm-up.
        weight_decay: AdamW weight decay.
        warmup: fraction of all steps with a linear warm-up (at least one step).
        alpha: weight of the distillation term (1 − alpha on the cross-entropy with the labels).
        temperature: distillation temperature T.
        seed: seeds the data order (per epoch).
        checkpoint_every: write a checkpoint every N steps (0: at the end of every epoch only).
        amp: autocast on CUDA (ignored on CPU).
    """
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    alpha: float = 0.7
    temperature: float = 2.0
    seed: int = 0
    checkpoint_every: int = 0
    amp: bool = True

    def validate(self) -> None:
        for name in ('epochs', 'batch_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if not 0 < self.lr < math.inf:
            raise ValueError(f'lr must be a finite number > 0, got {self.lr}')
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f'weight_decay must be a finite number >= 0, got {self.weight_decay}')
        if not 0 <= self.warmup < 1:
            raise ValueError(f'warmup must be in [0, 1), got {self.warmup}')
        if not 0 <= self.alpha <= 1:
            raise ValueError(f'alpha must be in [0, 1], got {self.alpha}')
        if not 0 < self.temperature < math.inf:
            raise ValueError(f'temperature must be > 0, got {self.temperature}')
        if self.checkpoint_every < 0:
            raise ValueError(f'checkpoint_every must be >= 0, got {self.checkpoint_every}')


@dataclass
class FinetuneResult:
    model: nn.Module
    steps: int
    history: List[dict] = field(default_factory=list)   # one entry per epoch: loss, lr, val top-1, time
    out: Optional[str] = None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, target), means over the batch.
    T² keeps the soft term's gradient scale independent of T."""
    T = temperature
    soft = F.kl_div(F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.float() / T, -1),
                    reduction='batchmean', log_target=True) * (T * T)
    return alpha * soft + (1 - alpha) * F.cross_entropy(student.float(), target)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------------
# distributed helpers

def init_distributed() -> Tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group (nccl on CUDA,
    gloo on CPU) and picks cuda:LOCAL_RANK; otherwise one process on cuda:0 or the CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get('LOCAL_RANK', '0'))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group('nccl' if cuda else 'gloo')
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device('cuda', torch.cuda.current_device()) if cuda and dist.get_backend() == 'nccl' \
            else torch.device('cpu')
        return rank, world, dev
    return 0, 1, torch.device('cuda' if cuda else 'cpu')


def _dist() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _on_rank0(fn: Callable, what: str, device: torch.device):
    """Run fn() on rank 0 only; every rank learns whether it worked and raises if it did not."""
    rank, world = _dist()
    err = None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, after the other ranks heard of it
            err = e
    if world > 1:
        flag = torch.tensor([0 if err is None else 1], device=device)
        dist.broadcast(flag, 0)
        if flag.item() and rank != 0:
            raise RuntimeError(f'rank 0 failed to {what}; see rank 0\'s error')
    if err is not None:
        raise err



def _check_inputs(student, teacher, x, y, val) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError('x_train and y_train must be tensors')
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f'x_train has {x.shape[0]} images but y_train {y.shape[0]} labels (need the same, > 0)')
    if y.dtype != torch.long:
        raise ValueError(f'y_train must hold int64 class indices, got {y.dtype}')
    with torch.no_grad():
        dev = next(student.parameters()).device
        probe = x[:2].to(dev)
        was = (student.training, teacher.training)
        student.eval(), teacher.eval()
        s, t = student(probe), teacher(probe.to(next(teacher.parameters()).device))
        student.train(was[0]), teacher.train(was[1])
    if s.shape != t.shape:
        raise ValueError(f'student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ: the teacher '
                         'must be the unpruned model of the same task')
    if int(y.max()) >= s.shape[-1] or int(y.min()) < 0:
        raise ValueError(f'labels range over [{int(y.min())}, {int(y.max())}] but the model has {s.shape[-1]} classes')
    if val is not None and (len(val) != 2 or val[0].shape[0] != val[1].shape[0]):
        raise ValueError('val must be (x_val, y_val) with as many labels as images')


@torch.no_grad()
def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 256) -> float:
    was = model.training
    model.eval()
    ok = sum(int((model(x[s:s + batch].to(device)).argmax(-1).cpu() == y[s:s + batch]).sum())
             for s in range(0, len(y), batch))
    model.train(was)
    return ok / len(y)


def finetune(student: nn.Module, teacher: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
             config: Optional[FinetuneConfig] = None, *, out: Optional[str] = None, overwrite: bool = False,
             checkpoint_dir: Optional[str] = None, resume: bool = False, stop_after: Optional[int] = None,
             val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, device=None,
             log: Optional[Callable[[str], None]] = print) -> FinetuneResult:
    """Distil `teacher` into `student` (trained in place) on (x_train, y_train).

    Args:
        student: the pruned model (from snp_fast.prune / load_pruned; needed for `out`).
        teacher: the unpruned model; frozen, eval mode.
        x_train, y_train: images (N, C, H, W) and int64 labels (N,); every rank passes the same tensors.
        config: FinetuneConfig (defaults if None).
        out: write the final model here with snp_fast.save_pruned (rank 0).
        checkpoint_dir: write checkpoints here (rank 0): every config.checkpoint_every steps, at the end of
            every epoch, and at `stop_after`. A folder that already holds a checkpoint is refused
            (FileExistsError) unless resume=True (continue it) or overwrite=True (replace it: only the files
            that checkpoint names); other files there are never touched (see save_checkpoint).
        resume: continue from the checkpoint in checkpoint_dir if there is one.
        stop_after: stop once this many optimizer steps are done in total (a checkpoint is written), to be
            continued later with resume=True.
        val: (x_val, y_val): held-out top-1 logged after every epoch.
        device: default: the device init_distributed() picks (cuda:LOCAL_RANK under torchrun).

    Raises:
        NonFiniteError: the student or teacher holds NaN/Inf, or an update made the weights NaN/Inf (the
            error names the step and the tensor; nothing with them is written, the last checkpoint is kept).
        CheckpointError: resume from a checkpoint that is malformed or made for another model or setting.
    """
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    cfg = config or FinetuneConfig()
    cfg.validate()
    log = log or (lambda *_: None)
    rank, world, auto_dev = init_distributed()
    device = torch.device(device) if device is not None else auto_dev
    if cfg.batch_size % world:
        raise ValueError(f'batch_size {cfg.batch_size} must be divisible by the number of processes ({world})')
    if (resume or stop_after is not None) and checkpoint_dir is None:
        raise ValueError('resume and stop_after need checkpoint_dir')
    if stop_after is not None and stop_after < 1:
        raise ValueError(f'stop_after must be >= 1, got {stop_after}')
    if out is not None:
        recipe = getattr(student, 'snp_recipe', None)
        if not isinstance(recipe, dict):
            raise ValueError('out= needs a student from snp_fast.prune() or load_pruned() (it carries the recipe)')
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
            raise FileExistsError(f'{out} exists and is not empty (pass overwrite=True to replace it)')
    if rank != 0:
        log = lambda *_: None  # noqa: E731
    student.to(device)
    teacher.to(device).eval()   # its forward runs under no_grad; its requires_grad flags are left alone
    if not any(p.requires_grad for p in student.parameters()):
        raise ValueError('no parameter of the student requires grad (was it pruned from a frozen model? '
                         'call student.requires_grad_(True))')
    for who, m in (('student', student), ('teacher', teacher)):
        bad = first_non_finite(m.state_dict().items())
        if bad is not None:
            raise NonFiniteError(f'the {who} holds NaN/Inf weights ({bad}): nothing to fine-tune')
    _check_inputs(student, teacher, x_train, y_train, val)
    if checkpoint_dir is not None:
        def check_checkpoint_dir():
            # a fresh run does not silently replace an earlier run's checkpoint, nor a checkpoint.json it did not
            # write (CheckpointError from checkpoint.committed)
            earlier = committed(checkpoint_dir)
            if earlier is not None and not resume and not overwrite:
                raise FileExistsError(f'{checkpoint_dir} holds the checkpoint of an earlier run ({earlier}): '
                                      'resume=True continues it, overwrite=True replaces it (only its own files)')
        _on_rank0(check_checkpoint_dir, f'use {checkpoint_dir} for checkpoints', device)

    per_rank = cfg.batch_size // world
    data = TensorDataset(x_train, y_train)
    # shuffle order = f(seed, epoch) on every rank; rank r takes positions r, r+W, ...: global batch s is
    # positions [s·B, (s+1)·B) of the permutation, whatever W is. drop_last: every step sees a full batch.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(data, batch_size=per_rank, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f'{len(data)} training images are fewer than one batch of {cfg.batch_size}')
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, round(cfg.warmup * total))

    student.train()
    decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=cfg.lr)
    use_amp = cfg.amp and device.type == 'cuda'
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler('cuda', enabled=use_amp and amp_dtype == torch.float16)

    step, history, partial = 0, [], {}
    last_checkpoint = None   # the step of the newest finite checkpoint on disk
    run_cfg = asdict(cfg)
    if resume and os.path.isfile(os.path.join(checkpoint_dir, CKPT_STATE)):
        meta = load_checkpoint(checkpoint_dir, student, opt)
        saved = {k: v for k, v in meta['config'].items() if k != 'checkpoint_every'}
        now = {k: v for k, v in run_cfg.items() if k != 'checkpoint_every'}
        if saved != now or meta.get('n_train') != len(data):
            raise CheckpointError(f'{checkpoint_dir}: the checkpoint was made with {saved} on {meta.get("n_train")} '
                                  f'images; this run has {now} on {len(data)} images')
        step, history = meta['step'], meta.get('history', [])
        if step > total:
            raise CheckpointError(f'{checkpoint_dir}: the checkpoint is at step {step}, past this run\'s {total} steps')
        partial = meta.get('partial_epoch') or {}
        if meta.get('scaler'):
            try:
                scaler.load_state_dict(meta['scaler'])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CheckpointError(f'{checkpoint_dir}: malformed GradScaler state: {e}') from e
        last_checkpoint = step
        log(f'resumed from {checkpoint_dir} at step {step}/{total}')
    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(student, device_ids=[device.index] if device.type == 'cuda' else None)

    def checkpoint():
        # the epoch's loss so far (summed over the ranks), so that a resumed epoch reports the whole epoch's mean
        total_loss = loss_sum.clone()
        if world > 1:
            dist.all_reduce(total_loss)
        state = {'step': step, 'epoch': step // steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
                 'total_steps': total, 'config': run_cfg, 'seed': cfg.seed, 'n_train': len(data),
                 'history': history, 'scaler': scaler.state_dict() if scaler.is_enabled() else None,
                 'partial_epoch': {'loss_sum': float(total_loss), 'steps': n_loss,
                                   'seconds': time.perf_counter() - t_epoch}}

        _on_rank0(lambda: save_checkpoint(checkpoint_dir, student, opt, state),
                  f'write a checkpoint to {checkpoint_dir}', device)
        return step

    t_start = time.perf_counter()
    # a resumed epoch starts from its checkpointed loss sum (all ranks' sum, counted once: on rank 0)
    loss_sum = torch.full((), partial.get('loss_sum', 0.0) if rank == 0 else 0.0, device=device)
    n_loss = partial.get('steps', 0)
    t_epoch = time.perf_counter() - partial.get('seconds', 0.0)
    while step < total and (stop_after is None or step < stop_after):
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        if skip == 0:
            t_epoch = time.perf_counter()
        for i, (xb, yb) in enumerate(loader):
            if i < skip:  # resuming mid-epoch: the same permutation, its first batches already done
                continue
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            for g in opt.param_groups:
                g['lr'] = cfg.lr * lr_factor(step, total, warmup)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                with torch.no_grad():
                    t_logits = teacher(xb)
                loss = kd_loss(model(xb), t_logits, yb, cfg.alpha, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            # a diverged update (NaN/Inf weights or AdamW moments; identical on every rank) stops the run before
            # anything is written: the last checkpoint stays the last finite one (under fp16 the GradScaler
            # skips non-finite gradients, so only a real divergence gets here)
            bad = first_non_finite(weights_and_moments(student, opt))
            if bad is not None:
                kept = (f'the last checkpoint (step {last_checkpoint}) in {checkpoint_dir} is kept' if
                        last_checkpoint is not None else 'no checkpoint was written')
                raise NonFiniteError(f'training diverged at step {step}/{total}: {bad} is NaN/Inf after the update '
                                     f'(loss {float(loss.detach()):.4g}, lr {opt.param_groups[0]["lr"]:.3g}); '
                                     f'no model or checkpoint holding it was written ({kept}). Lower the '
                                     f'learning rate (lr={cfg.lr:g})')
            loss_sum += loss.detach()
            n_loss += 1
            end_of_epoch = step % steps_per_epoch == 0
            stopping = stop_after is not None and step >= stop_after
            if end_of_epoch:
                if world > 1:
                    dist.all_reduce(loss_sum)
                entry = {'epoch': epoch + 1, 'step': step, 'loss': float(loss_sum) / (n_loss * world),
                         'lr': opt.param_groups[0]['lr'], 'time': time.perf_counter() - t_epoch}
                if val is not None:
                    entry['val_top1'] = _top1(student, val[0], val[1], device)
                history.append(entry)
                log(f'epoch {epoch + 1}/{cfg.epochs}: loss {entry["loss"]:.4f}, lr {entry["lr"]:.2e}'
                    + (f', val top-1 {entry["val_top1"]:.2%}' if 'val_top1' in entry else '')
                    + f' ({entry["time"]:.1f}s)')
                loss_sum.zero_()
                n_loss = 0
            if checkpoint_dir is not None and (end_of_epoch or stopping or
                                               (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                last_checkpoint = checkpoint()
            if stopping or end_of_epoch:
                break
    student.eval()
    done = step >= total
    if not done:
        log(f'stopped at step {step}/{total}; continue with resume=True (checkpoint in {checkpoint_dir})')
    if out is not None and done:
        from .io import save_pruned
        recipe = dict(student.snp_recipe)
        recipe['finetune'] = {'config': asdict(cfg), 'steps': total, 'world_size': world, 'n_train': len(data),
                              'history': history}

        def write():
            before = student.snp_recipe
            student.snp_recipe = recipe
            try:
                save_pruned(student, out, overwrite=overwrite)
            finally:
                student.snp_recipe = before
        _on_rank0(write, f'write the model to {out}', device)
        log(f'wrote {out} ({time.perf_counter() - t_start:.1f}s of training in this run)')
    return FinetuneResult(model=student, steps=step, history=history, out=out if done else None)
