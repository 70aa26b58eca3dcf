"""timm names this repository uses that timm does not export publicly: each is listed here with the
behaviour we rely on, so that a timm release that moves or changes one fails here, by name, rather than
somewhere deep in a model. Everything else comes from timm's public modules (a scan below keeps it so)."""
from __future__ import annotations

import ast
import inspect
import warnings

import pytest
from helpers import REPO

# module -> names taken from it, for timm modules whose name (or a parent's) starts with '_'.
ALLOWED_PRIVATE = {
    'timm.models._features': {'feature_take_indices'},  # MPViT.forward_intermediates / prune_intermediate_layers
}


def _private_timm_imports(path) -> set:
    """(module, name) pairs that ``path`` imports from timm modules with a private part."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'timm':
            if any(part.startswith('_') for part in node.module.split('.')):
                found |= {(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, '*') for alias in node.names
                      if alias.name.split('.')[0] == 'timm' and any(p.startswith('_') for p in alias.name.split('.'))}
    return found


def test_only_the_checked_private_timm_names_are_used():
    used = set()
    for folder in ('mpvit', 'tools', 'dev', 'classification', 'detectron2', 'deformable_detr', 'semantic_segmentation'):
        for path in (REPO / folder).rglob('*.py'):
            used |= {(m, n, path.relative_to(REPO).as_posix()) for m, n in _private_timm_imports(path)}
    unexpected = sorted(u for u in used if u[1] not in ALLOWED_PRIVATE.get(u[0], set()))
    assert not unexpected, f'private timm imports without a check in {__file__}: {unexpected}'


def test_feature_take_indices_keeps_its_contract():
    from timm.models._features import feature_take_indices

    params = list(inspect.signature(feature_take_indices).parameters)
    assert params[:2] == ['num_features', 'indices'], params
    assert feature_take_indices(4) == ([0, 1, 2, 3], 3)  # None: all
    assert feature_take_indices(4, 2) == ([2, 3], 3)  # int: the last n
    assert feature_take_indices(4, [0, -1]) == ([0, 3], 3)  # negative: from the end
    with pytest.raises(AssertionError):
        feature_take_indices(4, [4])


def test_public_replacements_are_exported():
    """What used to come from private modules, now from public ones (timm's and torch's)."""
    import torch
    from timm.layers import fast_layer_norm
    from timm.models import checkpoint

    assert callable(fast_layer_norm) and callable(checkpoint)
    assert torch.is_autocast_enabled('cpu') in (True, False)
    assert isinstance(torch.get_autocast_dtype('cpu'), torch.dtype)


def test_the_authors_registry_import_still_resolves():
    """dev/benchmark.py runs the authors' model file, which imports ``timm.models.registry`` (a deprecated
    alias timm keeps); the benchmark switches its ``register_model`` off while importing that file."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        import timm.models.registry as registry
    assert callable(registry.register_model)


def test_the_network_file_imports_no_weights_code():
    """``mpvit/models/mpvit.py`` is the paper's network: torch, timm and the project's small layers at module level
    (the weights code is imported only inside timm's ``load_pretrained`` hook), so ``models/`` does not sit above
    the weights code."""
    tree = ast.parse((REPO / 'mpvit/models/mpvit.py').read_text(encoding='utf-8'))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            imported.add('.' * node.level + (node.module or ''))
            imported |= {f'{node.module}.{alias.name}' for alias in node.names if node.module == 'mpvit'}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    allowed = {'mpvit.errors', '._aliases'}
    ours = {name for name in imported if name.startswith(('mpvit', '.'))}
    assert ours <= allowed, ours - allowed
