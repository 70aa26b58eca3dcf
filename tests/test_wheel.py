"""The wheel is usable on its own: built from the sources, installed into an empty folder and imported from
outside the checkout, it registers the timm models, finds every model zoo row's config (shipped as package
data) and declares what it imports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

# What the package needs to be built: the build files and the two trees it ships.
_SOURCES = ('setup.py', 'pyproject.toml', 'README.md', 'mpvit', 'configs')

_OUTSIDE = r'''
import json, sys
from pathlib import Path

import timm
import mpvit
from mpvit import model_zoo
from mpvit.errors import MissingFileError, UnknownNameError

root = Path(sys.argv[1]).resolve()
model = timm.create_model('mpvit_tiny', num_classes=3)
configs = {e.name: str(e.config_file) for e in model_zoo.entries()}
try:
    model_zoo.config_path('configs/detectron2/no_such.yaml')
    missing = None
except MissingFileError as e:
    missing = str(e)
try:
    model_zoo.resolve('zoo:no_such_row')
    unknown = None
except UnknownNameError as e:
    unknown = str(e)
print(json.dumps({
    'mpvit': mpvit.__file__, 'params': sum(p.numel() for p in model.parameters()),
    'configs': configs,
    'demo_config': str(model_zoo.find_config('configs/detectron2/demo/mask_rcnn_mpvit_tiny_shapes.yaml')),
    'missing': missing, 'unknown': unknown, 'root': str(root),
}))
'''


def _build_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of a copy of the sources: an in-tree build would leave build/ (and stale files in it
    from earlier builds) in the checkout."""
    pytest.importorskip('setuptools')
    src = tmp_path / 'src'
    src.mkdir()
    for name in _SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path / 'dist'
    proc = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                           '-q', '-w', str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    wheels = list(out.glob('mpvit-*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_works_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    tracked = {p.relative_to(REPO).as_posix() for p in (REPO / 'configs').rglob('*') if p.is_file()}
    assert {'mpvit/' + p for p in tracked} <= names, 'configs/ not shipped as mpvit/configs/'
    assert 'mpvit/model_zoo.json' in names
    requires = [line.split(':', 1)[1].strip() for line in metadata.splitlines() if line.startswith('Requires-Dist:')]
    plain = [r for r in requires if 'extra ==' not in r]
    assert any(r.startswith('PyYAML') for r in plain), plain  # mpvit.training reads the drivers' YAML configs
    assert not any(r.startswith('fvcore') for r in plain), plain  # only Detectron2 / the FLOP tables use it

    site = tmp_path / 'site'
    proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', '--target',
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    env = {**os.environ, 'PYTHONPATH': str(site), 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run([sys.executable, '-c', _OUTSIDE, str(site)], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got['mpvit']).resolve().is_relative_to(site.resolve()), got['mpvit']  # the wheel's, not the checkout
    assert got['params'] > 5_000_000
    packaged = (site / 'mpvit' / 'configs').resolve()
    assert len(got['configs']) == 23
    for name, path in got['configs'].items():
        assert Path(path).resolve().is_relative_to(packaged) and Path(path).is_file(), (name, path)
    demo = Path(got['demo_config']).resolve()  # a config no zoo row names ships too (its _BASE_ beside it)
    assert demo.is_relative_to(packaged) and (demo.parent.parent / 'Base-RCNN-FPN.yaml').is_file()
    assert got['missing'] and 'configs/detectron2/no_such.yaml: no such config' in got['missing']
    assert got['unknown'] and "'zoo:no_such_row'" in got['unknown'] and 'zoo:mpvit_small' in got['unknown']
