"""Small helpers shared by the test modules."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repository (``tools/x.py``, ``classification/main.py``) as a module."""
    path = REPO / relative_path
    name = '_script_' + relative_path.replace('/', '_').removesuffix('.py')
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def assert_scores(metrics: Mapping[str, Any], *keys: str, high: float = 100.0) -> None:
    """Each of ``keys`` is a number in [0, high] (a NaN or an infinity fails), not only printed."""
    for key in keys:
        value = metrics[key]
        assert isinstance(value, (int, float)) and 0.0 <= value <= high, f'{key} = {value!r} not in [0, {high}]'


class ForgedDtype:
    """An object dtype whose pickled flags were cleared: numpy would take the file's bytes as object pointers
    (a segmentation fault when the array is touched, or any address a crafted file aims at)."""

    def __reduce__(self):
        return np.dtype, ('O8', False, True), (3, '|', None, None, None, -1, -1, 0)


class ForgedArray:
    def __init__(self, dtype=None, data: bytes = b'A' * 16):
        self.dtype, self.data = dtype or ForgedDtype(), data

    def __reduce__(self):
        return ((np._core if hasattr(np, '_core') else np.core).multiarray._reconstruct,
                (np.ndarray, (0,), b'b'), (1, (len(self.data) // 8,), self.dtype, False, self.data))


def offline_hub(monkeypatch, cache: Path) -> None:
    """This process reads the Hub offline from ``cache`` (huggingface_hub reads its variables at import)."""
    from huggingface_hub import constants

    for name, value in (('HF_HUB_OFFLINE', True), ('HF_HUB_CACHE', str(cache))):
        monkeypatch.setenv(name, '1' if value is True else value)
        monkeypatch.setattr(constants, name, value)


def hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """A Hugging Face Hub cache holding ``folder`` as the main revision of ``repo_id`` (as a download leaves it)."""
    repo = root / ('models--' + repo_id.replace('/', '--'))
    revision = 'f' * 40
    shutil.copytree(folder, repo / 'snapshots' / revision)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    return root


def write_tiny_ade(root: Path, size=(64, 48)) -> Path:
    """An ADE20K-layout folder with one image and one index mask per split (the drivers check the data first)."""
    from PIL import Image

    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        Image.new('RGB', size, (90, 120, 30)).save(root / 'images' / split / f'ADE_{split}_00000001.jpg')
        Image.fromarray(np.ones(size[::-1], np.uint8)).save(root / 'annotations' / split / f'ADE_{split}_00000001.png')
    return root
