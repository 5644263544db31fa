"""snp_fast.finetune: distillation loss, schedule, checkpoints (resume == uninterrupted run), DDP (2 gloo
processes on CPU == 1 process with the same global batch), and the final model written by save_pruned."""
import copy
import json
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import snp_fast
from snp_fast.finetune import CheckpointError, FinetuneConfig, finetune, kd_loss, lr_factor

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _task():
    """A tiny random-init teacher, its pruned student (no re-fit), 64 random images with random labels."""
    import timm
    torch.manual_seed(0)
    teacher = timm.create_model('vit_tiny_patch16_224', pretrained=False, **TINY).eval()
    with torch.no_grad():
        teacher.head.weight.mul_(30)   # confident predictions, not the near-uniform ones of a fresh head
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    student, _ = snp_fast.prune(teacher, x[:16], ratios=0.5, refit=False)  # damaged: room to recover
    return teacher, student, x, y


@pytest.fixture(scope='module')
def task():
    return _task()


def _max_diff(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_kd_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7), torch.randn(5, 7), torch.randint(0, 7, (5,))
    T, a = 3.0, 0.6
    p_t = (t / T).softmax(-1)
    kl = (p_t * (p_t.log() - (s / T).log_softmax(-1))).sum(-1).mean()
    want = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    torch.testing.assert_close(kd_loss(s, t, y, a, T), want)
    assert kd_loss(t, t, y, 1.0, T).abs() < 1e-6            # student == teacher: no soft loss
    torch.testing.assert_close(kd_loss(s, t, y, 0.0, T), F.cross_entropy(s, y))


def test_lr_schedule():
    total, warm = 100, 10
    f = [lr_factor(i, total, warm) for i in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(f[10:], f[11:]))       # cosine decay is monotone
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[-1] < 1e-2


def test_finetune_improves_and_writes_loadable_model(task, tmp_path):
    teacher, student, x, y = task
    before = torch.nn.functional.kl_div(student(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True,
                                        reduction='batchmean').item()
    res = finetune(copy.deepcopy(student), teacher, x, y, FinetuneConfig(epochs=4, batch_size=16, lr=2e-3, alpha=1.0),
                   out=str(tmp_path / 'ft'), val=(x, y), log=None)
    m = snp_fast.load_pruned(str(tmp_path / 'ft'))
    assert _max_diff(m, res.model) == 0
    after = torch.nn.functional.kl_div(m(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True,
                                       reduction='batchmean').item()
    assert after < before
    assert res.history[-1]['loss'] < res.history[0]['loss'] and len(res.history) == 4
    recipe = json.loads((tmp_path / 'ft' / 'recipe.json').read_text())
    assert recipe['finetune']['steps'] == 16 and recipe['finetune']['config']['epochs'] == 4
    assert recipe['dims_after'] == student.snp_recipe['dims_after']
    assert all(p.requires_grad for p in teacher.parameters())   # the caller's teacher is not frozen behind its back


def test_resume_equals_uninterrupted(task, tmp_path):
    teacher, student, x, y = task
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=1e-3, checkpoint_every=2)
    full_run = finetune(copy.deepcopy(student), teacher, x, y, cfg, log=None)
    full = full_run.model
    part = finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=str(tmp_path / 'ck'), stop_after=5,
                    log=None)
    assert part.steps == 5 and part.out is None
    state = json.loads((tmp_path / 'ck' / 'checkpoint.json').read_text())
    assert state['step'] == 5 and state['seed'] == 0
    assert _max_diff(part.model, full) > 1e-4                # really stopped part-way
    # a fresh process would start from the unpruned student: resume must restore weights AND optimizer
    res = finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=str(tmp_path / 'ck'), resume=True,
                   out=str(tmp_path / 'out'), log=None)
    assert res.steps == 8
    assert _max_diff(res.model, full) == 0
    assert _max_diff(snp_fast.load_pruned(str(tmp_path / 'out')), full) == 0
    # the epoch the run stopped in reports its whole mean loss, not only the steps after the resume
    assert [h['loss'] for h in res.history] == [h['loss'] for h in full_run.history]


def test_interrupted_checkpoint_write_keeps_the_previous_one(task, tmp_path, monkeypatch):
    """A crash between writing the new weights and committing their JSON leaves the previous checkpoint
    usable (before, the new weights replaced the old ones first and resume failed on a step mismatch)."""
    teacher, student, x, y = task
    cfg = FinetuneConfig(epochs=2, batch_size=16, lr=1e-3, checkpoint_every=2)
    ck = str(tmp_path / 'ck')
    finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=ck, stop_after=2, log=None)
    real_replace = os.replace

    def replace(src, dst):  # the next checkpoint's JSON never lands
        if dst.endswith('checkpoint.json'):
            raise OSError('power cut')
        real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(OSError, match='power cut'):
        finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=ck, resume=True, stop_after=4, log=None)
    monkeypatch.undo()
    assert json.loads((tmp_path / 'ck' / 'checkpoint.json').read_text())['step'] == 2
    res = finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=ck, resume=True, log=None)
    full = finetune(copy.deepcopy(student), teacher, x, y, cfg, log=None).model
    assert res.steps == 8 and _max_diff(res.model, full) == 0
    assert sorted(os.listdir(ck)) == ['checkpoint-00000008.safetensors', 'checkpoint.json']


def test_resume_refuses_other_settings(task, tmp_path):
    teacher, student, x, y = task
    cfg = FinetuneConfig(epochs=2, batch_size=16)
    finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=str(tmp_path), stop_after=1, log=None)
    with pytest.raises(CheckpointError, match='lr'):
        finetune(copy.deepcopy(student), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16, lr=1e-2),
                 checkpoint_dir=str(tmp_path), resume=True, log=None)
    (tmp_path / 'checkpoint.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='not valid JSON'):
        finetune(copy.deepcopy(student), teacher, x, y, cfg, checkpoint_dir=str(tmp_path), resume=True, log=None)


@pytest.mark.parametrize('kwargs, match', [
    (dict(config=FinetuneConfig(epochs=0)), 'epochs'),
    (dict(config=FinetuneConfig(alpha=1.5)), 'alpha'),
    (dict(config=FinetuneConfig(batch_size=128)), 'fewer than one batch'),
    (dict(stop_after=2), 'checkpoint_dir'),
])
def test_bad_arguments(task, kwargs, match):
    teacher, student, x, y = task
    with pytest.raises(ValueError, match=match):
        finetune(copy.deepcopy(student), teacher, x, y, log=None, **kwargs)


def test_bad_inputs(task, tmp_path):
    import timm
    teacher, student, x, y = task
    with pytest.raises(ValueError, match='labels'):
        finetune(copy.deepcopy(student), teacher, x, y[:10], log=None)
    with pytest.raises(ValueError, match='classes'):
        finetune(copy.deepcopy(student), teacher, x, y + 10, log=None)
    other = timm.create_model('vit_tiny_patch16_224', pretrained=False, **{**TINY, 'num_classes': 3})
    with pytest.raises(ValueError, match='teacher logits'):
        finetune(copy.deepcopy(student), other, x, y, log=None)
    with pytest.raises(ValueError, match='recipe'):
        finetune(copy.deepcopy(teacher), teacher, x, y, out=str(tmp_path / 'o'), log=None)
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'f').write_text('x')
    with pytest.raises(FileExistsError):
        finetune(copy.deepcopy(student), teacher, x, y, out=str(tmp_path / 'full'), log=None)


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes on the CPU

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, ckpt):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    teacher, student, x, y = _task()
    try:
        finetune(student, teacher, x, y, FinetuneConfig(epochs=2, batch_size=16, lr=1e-3), out=out,
                 checkpoint_dir=ckpt, log=None)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp
    teacher, student, x, y = _task()
    one = finetune(copy.deepcopy(student), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16, lr=1e-3),
                   log=None).model
    out, ckpt = str(tmp_path / 'ddp'), str(tmp_path / 'ck')
    mp.spawn(_ddp_worker, args=(2, _free_port(), out, ckpt), nprocs=2, join=True)
    two = snp_fast.load_pruned(out)
    assert json.loads((tmp_path / 'ddp' / 'recipe.json').read_text())['finetune']['world_size'] == 2
    assert json.loads((tmp_path / 'ck' / 'checkpoint.json').read_text())['step'] == 8
    assert _max_diff(student, one) > 1e-3               # training moved the weights ...
    # ... identically in 2 processes and in 1, except the key biases: softmax ignores them, so their gradient
    # is rounding noise, which AdamW normalises into lr-sized steps whose sign depends on the summation order
    for m in (one, two):
        for blk in m.blocks:
            n = blk.attn.num_heads * blk.attn.qk_dim
            blk.attn.qkv.bias.data[n:2 * n] = 0
    assert _max_diff(two, one) < 1e-5
