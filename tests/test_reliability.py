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
    r = subprocess.run([sys.executable, '-c', _KILLED_SAVE, src, dest, where], capture_output=True, text=True)
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
                                      f'.snp_fast_new-{dead.pid}-{host}-q1w2', f'.snp_fast_new-{dead.pid}-00000000-r5t6'])
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
