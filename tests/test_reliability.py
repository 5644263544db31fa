"""Reliability (issue 20), library side: bad weights and unsafe recipes are refused by load_pruned, a killed
save leaves nothing behind for good, calibration images of every PIL mode keep their range, and fine-tuning
never writes non-finite weights nor deletes files it did not write."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import timm
import torch

import snp_fast
from snp_fast import io as snp_io

pytestmark = pytest.mark.filterwarnings('ignore:snp_fast. .*reference')


def _tiny_pruned():
    torch.manual_seed(0)
    m = timm.create_model('deit_tiny_patch16_224', pretrained=False, depth=1, img_size=32, num_classes=10).eval()
    pruned, _ = snp_fast.prune(m, torch.randn(2, 3, 32, 32), ratios=0.3, refit=False)
    return pruned


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    return snp_fast.save_pruned(_tiny_pruned(), str(tmp_path_factory.mktemp('rel') / 'm'))


@pytest.fixture
def copy_of(saved, tmp_path):
    d = str(tmp_path / 'm')
    shutil.copytree(saved, d)
    return d


def _rewrite_weights(d, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    w = os.path.join(d, 'model.safetensors')
    with safe_open(w, framework='pt') as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    save_file(state, w, metadata=meta)


# ------------------------------------------------------------------------------------------------
# 1. load_pruned refuses non-finite weights and tensors of another dtype

@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_load_refuses_non_finite_weights(copy_of, value):
    def edit(s):
        s['blocks.0.mlp.fc1.weight'][3, 1] = value
    _rewrite_weights(copy_of, edit)
    with pytest.raises(snp_fast.RecipeError, match=r'blocks\.0\.mlp\.fc1\.weight holds 1 NaN/Inf value'):
        snp_fast.load_pruned(copy_of)


@pytest.mark.parametrize('dtype, match', [
    (torch.float64, r'mixed float dtypes: blocks\.0\.attn\.qkv\.weight is torch\.float64 but the model\'s other '
                    r'floating tensors are torch\.float32'),
    (torch.int64, r'blocks\.0\.attn\.qkv\.weight is torch\.int64, but the model needs a floating tensor'),
    (torch.bool, r'blocks\.0\.attn\.qkv\.weight is torch\.bool'),
])
def test_load_refuses_a_tensor_of_another_dtype(copy_of, dtype, match):
    def edit(s):
        s['blocks.0.attn.qkv.weight'] = s['blocks.0.attn.qkv.weight'].to(dtype)
    _rewrite_weights(copy_of, edit)
    with pytest.raises(snp_fast.RecipeError, match=match):
        snp_fast.load_pruned(copy_of)


def test_a_model_saved_in_one_other_float_dtype_still_loads(copy_of):
    """One float dtype for every floating tensor is a model saved after .half() / .double(): loaded as it is."""
    for dtype in (torch.float16, torch.float64):
        def edit(s):
            for k in s:
                s[k] = s[k].to(dtype)
        _rewrite_weights(copy_of, edit)
        m = snp_fast.load_pruned(copy_of)
        assert {p.dtype for p in m.parameters()} == {dtype}


def test_integer_buffers_keep_their_dtype():
    from snp_fast.io import _check_weights
    state = {'w': torch.zeros(2), 'n': torch.zeros(1, dtype=torch.float32)}
    with pytest.raises(snp_fast.RecipeError, match=r'n is torch\.float32, but the model\'s n is torch\.int64'):
        _check_weights(state, {'w': torch.float32, 'n': torch.int64}, 'x.safetensors')
    _check_weights({'w': torch.zeros(2), 'n': torch.zeros(1, dtype=torch.int64)},
                   {'w': torch.float32, 'n': torch.int64}, 'x.safetensors')


@pytest.mark.parametrize('device, match', [('meta', 'meta device holds no data'), ('nonsense', 'not a torch device'),
                                           ('cuda:99', 'cuda:99')])
def test_load_refuses_a_device_it_cannot_load_onto(saved, device, match):
    with pytest.raises(ValueError, match=match):
        snp_fast.load_pruned(saved, device=device)


def test_save_refuses_non_finite_weights(tmp_path):
    pruned = _tiny_pruned()
    with torch.no_grad():
        pruned.head.bias[2] = float('nan')
    with pytest.raises(ValueError, match=r'head\.bias holds NaN/Inf'):
        snp_fast.save_pruned(pruned, str(tmp_path / 'm'))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 2. a recipe is data: no hub, URL, path or loading argument reaches timm

UNSAFE = [
    ({'timm_name': 'hf-hub:timm/deit_tiny_patch16_224.fb_in1k'}, 'not a plain timm model name'),
    ({'timm_name': 'local-dir:/tmp'}, 'not a plain timm model name'),
    ({'timm_name': 'https://example.com/deit.json'}, 'not a plain timm model name'),
    ({'timm_name': '/etc/passwd'}, 'not a plain timm model name'),
    ({'timm_name': '../deit_tiny_patch16_224'}, 'not a plain timm model name'),
    ({'timm_name': ['deit_tiny_patch16_224']}, 'not a plain timm model name'),
    ({'timm_name': 'no_such_model_at_all'}, 'not a model this timm'),
    ({'timm_kwargs': {'checkpoint_path': '/etc/passwd'}}, r"\['checkpoint_path'\]"),
    ({'timm_kwargs': {'pretrained': True}}, r"\['pretrained'\]"),
    ({'timm_kwargs': {'pretrained_cfg': {'hf_hub_id': 'timm/x'}}}, r"\['pretrained_cfg'\]"),
    ({'timm_kwargs': {'pretrained_cfg_overlay': {'file': '/etc/passwd'}}}, r"\['pretrained_cfg_overlay'\]"),
    ({'timm_kwargs': {'cache_dir': '/tmp/elsewhere'}}, r"\['cache_dir'\]"),
    ({'timm_kwargs': {'pruned': True}}, r"\['pruned'\]"),
    ({'timm_kwargs': {'weight_init': 'https://example.com/w'}}, 'weight_init .* names a location'),
    ({'timm_kwargs': {'act_layer': {'x': ['/etc/passwd']}}}, r'act_layer\.x\[0\] .* names a location'),
    ({'timm_kwargs': ['img_size', 32]}, 'must be a JSON object'),
]


@pytest.mark.parametrize('change, match', UNSAFE, ids=[str(i) for i in range(len(UNSAFE))])
def test_unsafe_recipe_is_refused_before_timm_runs(copy_of, monkeypatch, change, match):
    path = os.path.join(copy_of, 'recipe.json')
    recipe = json.load(open(path))
    for k, v in change.items():
        recipe[k] = v if k != 'timm_kwargs' or not isinstance(v, dict) else {**recipe['timm_kwargs'], **v}
    json.dump(recipe, open(path, 'w'))
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    with pytest.raises(snp_fast.RecipeError, match=match):
        snp_io.load_recipe(copy_of)
    with pytest.raises(snp_fast.RecipeError, match=match):
        snp_fast.load_pruned(copy_of)
    assert calls == []   # refused before timm was asked to build anything


def test_safe_recipes_pass():
    snp_io.check_recipe_safe({'timm_name': 'deit_tiny_patch16_224.fb_in1k',
                              'timm_kwargs': {'img_size': [32, 48], 'act_layer': 'gelu_tanh', 'global_pool': 'avg',
                                              'weight_init': 'jax', 'dynamic_img_size': True}})
    snp_io.check_recipe_safe({'timm_name': 'vit_tiny_patch16_224', 'timm_kwargs': None})


def test_save_refuses_a_recipe_load_would_refuse(tmp_path):
    pruned = _tiny_pruned()
    pruned.snp_recipe = dict(pruned.snp_recipe, timm_name='hf-hub:timm/deit_tiny_patch16_224')
    with pytest.raises(snp_fast.RecipeError, match='not a plain timm model name'):
        snp_fast.save_pruned(pruned, str(tmp_path / 'm'))
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# 3. a save killed half-way: its temp folders are cleaned by the next save into the same parent

_KILLED_SAVE = r'''
import os, signal, sys
import snp_fast, safetensors.torch
m = snp_fast.load_pruned(sys.argv[1])
where = sys.argv[3]
if where == 'weights':          # killed while the weights are being written
    real = safetensors.torch.save_file
    def save_file(state, path, metadata=None):
        open(path, 'wb').write(b'half')
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_file = save_file
else:                           # killed between moving the previous save aside and renaming the new one in
    real_replace, n = os.replace, []
    def replace(src, dst):
        n.append(dst)
        if len(n) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
snp_fast.save_pruned(m, sys.argv[2], overwrite=True)
'''


def _killed_save(src, dest, where):
    root = os.path.dirname(os.path.dirname(os.path.abspath(snp_fast.__file__)))   # this checkout's snp_fast
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get('PYTHONPATH')])))
    r = subprocess.run([sys.executable, '-c', _KILLED_SAVE, src, dest, where], capture_output=True, text=True,
                       env=env)
    assert r.returncode == -9, r.stderr


def test_killed_save_leaves_temp_that_the_next_save_removes(saved, tmp_path):
    _killed_save(saved, str(tmp_path / 'a'), 'weights')
    left = [n for n in os.listdir(tmp_path) if n.startswith('.snp_fast_')]
    assert len(left) == 1 and not (tmp_path / 'a').exists()
    (tmp_path / 'mine').mkdir()   # the user's folder beside it is never touched
    snp_fast.save_pruned(snp_fast.load_pruned(saved), str(tmp_path / 'b'))
    assert sorted(os.listdir(tmp_path)) == ['b', 'mine']


def test_killed_overwrite_puts_the_previous_save_back(saved, tmp_path):
    shutil.copytree(saved, tmp_path / 'a')
    before = open(tmp_path / 'a' / 'model.safetensors', 'rb').read()
    _killed_save(saved, str(tmp_path / 'a'), 'swap')
    assert not (tmp_path / 'a').exists()   # the previous save sits in the temp folder
    snp_fast.save_pruned(snp_fast.load_pruned(saved), str(tmp_path / 'b'))
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']
    assert open(tmp_path / 'a' / 'model.safetensors', 'rb').read() == before
    snp_fast.load_pruned(str(tmp_path / 'a'))


def test_only_stale_snp_fast_temp_folders_are_removed(tmp_path):
    host = snp_io._host()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    old = time.time() - snp_io.STALE_AGE_S - 60
    made = {
        '.snp_fast_abcd_123': old,                     # snp_fast's older mkdtemp name, a day old: removed
        '.snp_fast_old_x1y2z3w4': old,                 # (also an older "old" folder, empty): removed
        '.snp_fast_k9k9k9k9': None,                    # the same, fresh (another save may be running): kept
        f'.snp_fast_new-{os.getpid()}-{host}-q1w2': None,   # made by a live process: kept
        f'.snp_fast_new-{dead.pid}-{host}-q1w2': None,      # made by a process that is gone: removed
        f'.snp_fast_new-{dead.pid}-00000000-q1w2': None,    # another host's, fresh: kept
        f'.snp_fast_new-{dead.pid}-00000000-r5t6': old,     # another host's, a day old: removed
        '.snp_fast_keep_me_please': old,               # not a name snp_fast gives: kept
        'snp_fast_abcd1234': old,                      # not hidden: kept
    }
    for name, t in made.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / 'f').write_text('x')
        if t:
            os.utime(tmp_path / name, (t, t))
    (tmp_path / '.snp_fast_fileabcd').write_text('x')                  # a file, not a folder: kept
    os.utime(tmp_path / '.snp_fast_fileabcd', (old, old))
    (tmp_path / '.snp_fast_old_d1d2d3d4' / 'd').mkdir(parents=True)    # an older "old" folder holding a save but
    os.utime(tmp_path / '.snp_fast_old_d1d2d3d4', (old, old))          # not saying where it belongs: kept
    os.symlink(tmp_path / 'snp_fast_abcd1234', tmp_path / '.snp_fast_lnk12345')   # a link: kept
    removed = snp_io.clean_stale_temp(str(tmp_path))
    assert sorted(removed) == sorted(['.snp_fast_abcd_123', '.snp_fast_old_x1y2z3w4',
                                      f'.snp_fast_new-{dead.pid}-{host}-q1w2',
                                      f'.snp_fast_new-{dead.pid}-00000000-r5t6'])
    assert sorted(os.listdir(tmp_path)) == sorted(set(made) - set(removed) | {
        '.snp_fast_fileabcd', '.snp_fast_old_d1d2d3d4', '.snp_fast_lnk12345'})
    assert (tmp_path / 'snp_fast_abcd1234' / 'f').exists()


# ------------------------------------------------------------------------------------------------
# 4. calibration images of every PIL mode keep their range (convert('RGB') clipped them to white)

def _folder_pixels(folder, in_chans=3):
    """{file name: uint8 array} as load_folder hands the images to the model's transform."""
    import numpy as np
    from snp_fast.calib import load_folder
    seen = {}

    def transform(im):
        seen[len(seen)] = np.asarray(im).copy()
        return torch.zeros(1)
    _, info = load_folder(str(folder), transform, num=100, in_chans=in_chans, progress=False)
    assert info.skipped == 0, info.describe()
    return {os.path.basename(f): seen[i] for i, f in enumerate(info.files)}


def test_16_bit_and_float_images_keep_their_range(tmp_path):
    """A real photo (scikit-image's camera) saved as a 16-bit PNG, a 16-bit big-endian TIFF, a 32-bit integer
    TIFF and float TIFFs ([0, 1] and another range) is the same 8-bit photo after loading."""
    import numpy as np
    from PIL import Image
    skdata = pytest.importorskip('skimage.data')
    cam = skdata.camera()                                   # (512, 512) uint8
    Image.fromarray(cam.astype(np.uint16) * 257).save(tmp_path / 'cam16.png')
    Image.fromarray((cam.astype(np.uint16) * 257).astype('>u2')).save(tmp_path / 'cam16be.tif')
    Image.fromarray(cam.astype(np.int32) * 257).save(tmp_path / 'cam_i32.tif')
    Image.fromarray(cam.astype(np.float32) / 255).save(tmp_path / 'cam_f01.tif')
    Image.fromarray(cam.astype(np.float32) * 4 - 300).save(tmp_path / 'cam_fwide.tif')
    modes = {n: Image.open(tmp_path / n).mode for n in os.listdir(tmp_path)}
    assert modes == {'cam16.png': 'I;16', 'cam16be.tif': 'I;16B', 'cam_i32.tif': 'I', 'cam_f01.tif': 'F',
                     'cam_fwide.tif': 'F'}
    got = _folder_pixels(tmp_path)
    lo, hi = float(cam.min()), float(cam.max())
    stretched = np.rint((cam.astype(np.float64) - lo) * (255 / (hi - lo))).astype(np.uint8)
    for name, want in [('cam16.png', cam), ('cam16be.tif', cam), ('cam_i32.tif', cam), ('cam_f01.tif', cam),
                       ('cam_fwide.tif', stretched)]:
        a = got[name]
        assert a.shape == (512, 512, 3) and a.dtype == np.uint8, name
        assert (a == want[..., None]).all(), (name, np.abs(a.astype(int) - want[..., None]).max())
    gray = _folder_pixels(tmp_path, in_chans=1)
    assert all(a.shape == (512, 512) for a in gray.values())
    assert (gray['cam16.png'] == cam).all() and (gray['cam_f01.tif'] == cam).all()


def test_alpha_palette_bilevel_and_cmyk_images(tmp_path):
    """Transparent pixels become white (not the colour hidden under them); palette, bilevel and CMYK images
    keep their content."""
    import numpy as np
    from PIL import Image
    skdata = pytest.importorskip('skimage.data')
    astro = skdata.astronaut()                                   # (512, 512, 3) uint8
    alpha = np.full(astro.shape[:2], 255, np.uint8)
    alpha[:, :256] = 0                                           # left half fully transparent
    Image.fromarray(np.dstack([astro, alpha]), 'RGBA').save(tmp_path / 'rgba.png')
    gray = skdata.camera()
    Image.fromarray(np.dstack([gray, alpha]), 'LA').save(tmp_path / 'la.png')
    pal = Image.fromarray(astro).quantize(16)
    p = np.asarray(pal).copy()
    p[:, :256] = 15
    pal = Image.fromarray(p, 'P')
    pal.putpalette(Image.fromarray(astro).quantize(16).getpalette())
    pal.info['transparency'] = 15
    pal.save(tmp_path / 'p.png', transparency=15)
    Image.fromarray(gray > 128).save(tmp_path / 'bilevel.png')
    Image.fromarray(astro).convert('CMYK').save(tmp_path / 'cmyk.tif')
    modes = {n: Image.open(tmp_path / n).mode for n in os.listdir(tmp_path)}
    assert modes == {'rgba.png': 'RGBA', 'la.png': 'LA', 'p.png': 'P', 'bilevel.png': '1', 'cmyk.tif': 'CMYK'}
    got = _folder_pixels(tmp_path)
    for name in ('rgba.png', 'la.png', 'p.png'):
        assert (got[name][:, :256] == 255).all(), name           # transparent: white
    assert (got['rgba.png'][:, 256:] == astro[:, 256:]).all()
    assert (got['la.png'][:, 256:] == gray[:, 256:, None]).all()
    assert set(np.unique(got['bilevel.png'])) == {0, 255}
    assert ((got['bilevel.png'][..., 0] == 255) == (gray > 128)).all()
    assert (got['cmyk.tif'] == astro).all()


def test_non_finite_float_image_is_skipped_and_counted(tmp_path):
    import numpy as np
    from PIL import Image
    from snp_fast.calib import CalibError, load_folder
    a = np.zeros((16, 16), np.float32)
    a[3, 3] = np.nan
    Image.fromarray(a).save(tmp_path / 'nan.tif')
    with pytest.raises(CalibError, match='none of its 1 files is a readable image'):
        load_folder(str(tmp_path), lambda im: torch.zeros(1), num=4, progress=False)


# ------------------------------------------------------------------------------------------------
# 5.-7. fine-tuning: never a non-finite model or checkpoint, never a file it did not write, clear resume errors

from snp_fast.finetune import (CheckpointError, FinetuneConfig, NonFiniteError, finetune,  # noqa: E402
                               load_checkpoint)

FT_TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope='module')
def task():
    torch.manual_seed(0)
    teacher = timm.create_model('vit_tiny_patch16_224', pretrained=False, **FT_TINY).eval()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    student, _ = snp_fast.prune(teacher, x[:16], ratios=0.5, refit=False)
    return teacher, student, x, y


def _student(task):
    import copy
    return copy.deepcopy(task[1])


def _files(d):
    return {n: open(os.path.join(d, n), 'rb').read() for n in sorted(os.listdir(d))}


def _opt_for(student):
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': no_decay, 'weight_decay': 0.0}])


def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(task, tmp_path):
    """lr 1e4 makes AdamW's second moment overflow at step 2 (the weights follow at step 3): the run stops
    there naming the step, writes no model, and the checkpoint of step 1 stays whole and resumable."""
    teacher, _, x, y = task
    cfg = FinetuneConfig(epochs=4, batch_size=16, lr=1e4, checkpoint_every=1)
    ck, out = str(tmp_path / 'ck'), str(tmp_path / 'out')
    with pytest.raises(NonFiniteError, match=r'diverged at step 2/16: .* is NaN/Inf .*last checkpoint \(step 1\)'):
        finetune(_student(task), teacher, x, y, cfg, out=out, checkpoint_dir=ck, log=None)
    assert not os.path.exists(out)
    state = json.load(open(os.path.join(ck, 'checkpoint.json')))
    assert state['step'] == 1 and sorted(os.listdir(ck)) == ['checkpoint-00000001.safetensors', 'checkpoint.json']
    fresh = _student(task)
    load_checkpoint(ck, fresh, _opt_for(fresh))
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    before = _files(ck)
    res = finetune(_student(task), teacher, x, y, cfg, checkpoint_dir=ck, resume=True, stop_after=1, log=None)
    assert res.steps == 1
    with pytest.raises(NonFiniteError, match='diverged at step 2/16'):   # resumed: the same trajectory
        finetune(_student(task), teacher, x, y, cfg, out=out, checkpoint_dir=ck, resume=True, log=None)
    assert _files(ck) == before and not os.path.exists(out)


def test_a_student_or_teacher_holding_nan_is_refused_before_training(task, tmp_path):
    teacher, _, x, y = task
    s = _student(task)
    with torch.no_grad():
        s.blocks[1].mlp.fc2.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match=r'the student holds NaN/Inf weights \(blocks\.1\.mlp\.fc2\.weight\)'):
        finetune(s, teacher, x, y, FinetuneConfig(epochs=1, batch_size=16), out=str(tmp_path / 'o'),
                 checkpoint_dir=str(tmp_path / 'ck'), log=None)
    import copy
    t = copy.deepcopy(teacher)
    with torch.no_grad():
        t.head.bias[1] = float('inf')
    with pytest.raises(NonFiniteError, match=r'the teacher holds NaN/Inf weights \(head\.bias\)'):
        finetune(_student(task), t, x, y, FinetuneConfig(epochs=1, batch_size=16), out=str(tmp_path / 'o'), log=None)
    assert os.listdir(tmp_path) == []


def test_checkpoints_never_delete_or_replace_files_they_did_not_write(task, tmp_path):
    """A user's checkpoint-best.safetensors / checkpoint.safetensors / checkpoint-00000099.safetensors in the
    checkpoint folder survive a run (the cleanup matched them by pattern and deleted them)."""
    from safetensors.torch import save_file
    teacher, _, x, y = task
    ck = tmp_path / 'ck'
    ck.mkdir()
    save_file({'w': torch.ones(3)}, str(ck / 'checkpoint-best.safetensors'))
    (ck / 'checkpoint.safetensors').write_bytes(b'the user\'s own')
    (ck / 'checkpoint-00000099.safetensors').write_bytes(b'also the user\'s')
    (ck / 'notes.txt').write_text('keep me')
    user = _files(ck)
    finetune(_student(task), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16, checkpoint_every=1),
             checkpoint_dir=str(ck), log=None)
    after = _files(ck)
    assert {k: after[k] for k in user} == user
    assert sorted(set(after) - set(user)) == ['checkpoint-00000008.safetensors', 'checkpoint.json']


def test_a_foreign_file_where_the_weights_go_is_refused(task, tmp_path):
    teacher, _, x, y = task
    ck = tmp_path / 'ck'
    ck.mkdir()
    (ck / 'checkpoint-00000001.safetensors').write_bytes(b'not ours')
    with pytest.raises(CheckpointError, match='checkpoint-00000001.safetensors exists and was not written by'):
        finetune(_student(task), teacher, x, y, FinetuneConfig(epochs=1, batch_size=16, checkpoint_every=1),
                 checkpoint_dir=str(ck), log=None)
    assert _files(ck) == {'checkpoint-00000001.safetensors': b'not ours'}


def test_a_fresh_run_does_not_replace_an_earlier_checkpoint_unless_told(task, tmp_path):
    teacher, _, x, y = task
    cfg = FinetuneConfig(epochs=1, batch_size=16)
    ck = str(tmp_path / 'ck')
    finetune(_student(task), teacher, x, y, cfg, checkpoint_dir=ck, stop_after=2, log=None)
    before = _files(ck)
    with pytest.raises(FileExistsError, match=r'holds the checkpoint of an earlier run .*resume=True'):
        finetune(_student(task), teacher, x, y, cfg, checkpoint_dir=ck, log=None)
    assert _files(ck) == before
    (tmp_path / 'ck' / 'mine.txt').write_text('x')
    finetune(_student(task), teacher, x, y, cfg, checkpoint_dir=ck, overwrite=True, log=None)
    assert sorted(os.listdir(ck)) == ['checkpoint-00000004.safetensors', 'checkpoint.json', 'mine.txt']
    (tmp_path / 'ck' / 'checkpoint.json').write_text('{"format": "someone-else/1"}')   # not ours: never replaced
    for kw in ({}, {'overwrite': True}):
        with pytest.raises(CheckpointError, match='unknown checkpoint format'):
            finetune(_student(task), teacher, x, y, cfg, checkpoint_dir=ck, log=None, **kw)
    assert (tmp_path / 'ck' / 'checkpoint.json').read_text() == '{"format": "someone-else/1"}'


@pytest.fixture
def checkpoint(task, tmp_path):
    teacher, _, x, y = task
    ck = str(tmp_path / 'ck')
    finetune(_student(task), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16), checkpoint_dir=ck,
             stop_after=2, log=None)
    return ck


def test_a_truncated_checkpoint_is_a_checkpoint_error(task, checkpoint):
    teacher, _, x, y = task
    w = os.path.join(checkpoint, 'checkpoint-00000002.safetensors')
    data = open(w, 'rb').read()
    open(w, 'wb').write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        finetune(_student(task), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16), checkpoint_dir=checkpoint,
                 resume=True, log=None)


GARBLED = [
    ('optimizer', 'garbage', '"optimizer" must be an object'),
    ('optimizer', {'param_groups': 'x'}, '"optimizer" must be an object'),
    ('optimizer', {'param_groups': [{'lr': 'fast'}]}, '1 optimizer param groups'),
    ('optimizer', lambda o: {**o, 'param_groups': [{**g, 'betas': 'xy'} for g in o['param_groups']]}, 'betas'),
    ('optimizer', lambda o: {**o, 'param_groups': [{**g, 'lr': None} for g in o['param_groups']]}, 'lr = None'),
    ('optimizer', lambda o: {**o, 'param_groups': [{k: v for k, v in g.items() if k != 'eps'}
                                                   for g in o['param_groups']]}, 'settings'),
    ('optimizer', lambda o: {**o, 'param_groups': [{**g, 'params': g['params'][:1]} for g in o['param_groups']]},
     'parameters'),
    ('optimizer', lambda o: {**o, 'scalars': {'x.step': 1}}, 'malformed optimizer state'),
    ('optimizer', lambda o: {**o, 'scalars': {'999.step': 1}}, 'optimizer state for parameter 999'),
    ('optimizer', lambda o: {**o, 'scalars': {'0.step': 'one'}}, r"optimizer state 0\.step = 'one'"),
    ('step', 'two', '"step" must be an integer'),
    ('step', 10 ** 6, 'past this run'),
    ('config', 5, '"config" must be an object'),
    ('partial_epoch', {'loss_sum': 'x'}, 'partial_epoch'),
    ('history', {'a': 1}, '"history" must be a list'),
]


@pytest.mark.parametrize('key, value, match', GARBLED, ids=[str(i) for i in range(len(GARBLED))])
def test_a_garbled_checkpoint_json_is_a_checkpoint_error(task, checkpoint, key, value, match):
    """Every field finetune reads is checked before the model or the optimizer is touched."""
    teacher, _, x, y = task
    path = os.path.join(checkpoint, 'checkpoint.json')
    meta = json.load(open(path))
    meta[key] = value(meta[key]) if callable(value) else value
    if key == 'step' and isinstance(value, int):   # keep the weights paired with the JSON
        from safetensors.torch import load_file, save_file
        w = os.path.join(checkpoint, meta['weights'])
        t = load_file(w)
        t['meta.step'] = torch.tensor(value)
        save_file(t, w, metadata={'format': 'snp_fast.finetune-checkpoint/1'})
    json.dump(meta, open(path, 'w'))
    s = _student(task)
    with pytest.raises(CheckpointError, match=match):
        finetune(s, teacher, x, y, FinetuneConfig(epochs=2, batch_size=16), checkpoint_dir=checkpoint, resume=True,
                 log=None)
    if key != 'step':   # nothing half-loaded: the student keeps its weights
        s2, fresh = _student(task), _student(task)
        with pytest.raises(CheckpointError):
            load_checkpoint(checkpoint, s2, _opt_for(s2))
        assert all(torch.equal(a, b) for a, b in zip(s2.state_dict().values(), fresh.state_dict().values()))


def test_non_finite_checkpoint_weights_are_a_checkpoint_error(task, checkpoint):
    from safetensors.torch import load_file, save_file
    teacher, _, x, y = task
    w = os.path.join(checkpoint, 'checkpoint-00000002.safetensors')
    t = load_file(w)
    t['model.head.weight'][0, 0] = float('nan')
    save_file(t, w, metadata={'format': 'snp_fast.finetune-checkpoint/1'})
    with pytest.raises(CheckpointError, match=r'model|head\.weight holds NaN/Inf'):
        finetune(_student(task), teacher, x, y, FinetuneConfig(epochs=2, batch_size=16), checkpoint_dir=checkpoint,
                 resume=True, log=None)


def test_more_calibration_images_than_fit_are_refused_at_once(tmp_path, monkeypatch):
    """--num-calib 1000000 was killed by the OOM killer after loading; now refused after the first image."""
    import numpy as np
    from PIL import Image
    from snp_fast import calib
    monkeypatch.setattr(calib, '_available_memory', lambda: 64 * 2**20)    # 64 MiB available
    transform = lambda im: torch.zeros(3, 224, 224)                        # noqa: E731 -- 588 KiB per image
    with pytest.raises(calib.CalibError, match=r'--num-calib 1000000: 1000000 calibration images of \(3, 224, '
                                               r'224\) would take 560\.8 GiB.* at most 27 fit here'):
        calib.default_calib(transform, 1000000)
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f'{i}.png')
    with pytest.raises(calib.CalibError, match='--num-calib 100: 40 calibration images .* at most 27 fit'):
        calib.load_folder(str(tmp_path), transform, 100, progress=False)
    x, info = calib.load_folder(str(tmp_path), transform, 27, progress=False)
    assert x.shape == (27, 3, 224, 224)


def test_first_non_finite_names_the_tensor():
    """The per-step check (min/max of every tensor) finds NaN, +Inf and -Inf in any float dtype, skips empty
    (zero-width) and integer tensors, and takes the largest finite values as finite."""
    from snp_fast.checkpoint import first_non_finite as _first_non_finite
    ok = {'a': torch.zeros(3), 'empty': torch.zeros(0, 4), 'n': torch.ones(2, dtype=torch.long),
          'big': torch.tensor([65504.0, -65504.0], dtype=torch.float16), 'b': torch.ones(5, dtype=torch.bfloat16)}
    assert _first_non_finite(ok.items()) is None
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for v in (float('nan'), float('inf'), -float('inf')):
            bad = dict(ok, c=torch.ones(7, dtype=dtype), d=torch.ones(2))
            bad['c'][4] = v
            bad['d'][0] = float('nan')
            assert _first_non_finite(bad.items()) == 'c', (dtype, v)


def test_save_pruned_overwrite_follows_the_output_rule(tmp_path, monkeypatch):
    """The Python API follows the command line's rule: overwrite=True replaces a model folder, never a folder with
    other files in it (named, nothing lost) nor the current directory."""
    import snp_fast
    from snp_fast.demo import digits_data, load_digits_vit
    pruned, _ = snp_fast.prune(load_digits_vit(), digits_data()[0][:4], 0.5, refit=False)
    snp_fast.save_pruned(pruned, str(tmp_path / 'm'))
    snp_fast.save_pruned(pruned, str(tmp_path / 'm'), overwrite=True)  # a model folder: replaced
    (tmp_path / 'm' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='notes.txt'):
        snp_fast.save_pruned(pruned, str(tmp_path / 'm'), overwrite=True)
    assert (tmp_path / 'm' / 'notes.txt').read_text() == 'mine'
    monkeypatch.chdir(tmp_path / 'm')
    (tmp_path / 'm' / 'notes.txt').unlink()
    with pytest.raises(ValueError, match='current directory'):
        snp_fast.save_pruned(pruned, '.', overwrite=True)
    assert (tmp_path / 'm' / 'model.safetensors').exists()
