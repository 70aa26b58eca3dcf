"""MPViT's timm face: the pretrained sources and configs, and the registered ``mpvit_*`` entrypoints.

Beside the weights code rather than in the network file: every pretrained source
goes through this repository's loader (:mod:`mpvit.weights`, :mod:`mpvit.checkpoint`),
and the released checkpoints' configs come from ``model_zoo.json``. Imported by
:mod:`mpvit.models`, so ``import mpvit`` registers the models with timm. timm files a family under the
name of the module that registers it, hence this module's name: ``timm.list_models(module='mpvit')``.
"""
import os
from typing import Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from mpvit import model_zoo
from mpvit.checkpoint import CheckpointError, checkpoint_filter_fn, local_checkpoint
from mpvit.errors import InvalidInputError
from mpvit.weights import HUB_PREFIX

from ..features import MPViTFeatures
from ..mpvit import MPViT, mpvit_arch

__all__ = ['default_cfgs']


def _pretrained_source(variant: str, kwargs: Dict) -> Dict:
    """The ``pretrained_cfg_overlay`` that sends every pretrained source through this repository's loader.

    timm would download a URL into its cache unchecked, and skips a Hub id for models with a custom
    loader. Instead the file is found here (:func:`mpvit.weights.fetch`: the local weights directory, the
    Hub, then the URLs; ``hf-hub:`` ids through the Hub's cache), and ``MPViT.load_pretrained`` reads it
    without running code, whatever its format.
    """
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if overlay.get('state_dict') is not None:  # an in-memory state dict: timm's own loader and our filter
        return {**overlay, 'custom_load': False}
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay)
    released = model_zoo.by_url(cfg.url) if cfg.url else None
    # timm's order: a file, a local folder ('local-dir:'), a Hub id (the released one's Hub copy is one of
    # the places fetch() looks for its URL), then the URL.
    if cfg.file and cfg.source != 'local-dir':
        source = cfg.file
    elif cfg.source == 'local-dir':
        folder = cfg.file or ''
        names = [n for n in ('model.safetensors', 'pytorch_model.bin') if os.path.isfile(os.path.join(folder, n))]
        if not names:
            raise CheckpointError(f'{variant}: {folder} holds no model.safetensors or pytorch_model.bin')
        source = os.path.join(folder, names[0])
    elif cfg.hf_hub_id and (cfg.source == 'hf-hub' or not cfg.url or not released
                            or released.hf_hub_id != cfg.hf_hub_id):
        source = f'{HUB_PREFIX}{cfg.hf_hub_id}' + (f'/{cfg.hf_hub_filename}' if cfg.hf_hub_filename else '')
    elif cfg.url:
        source = cfg.url
    else:
        raise CheckpointError(f'{variant}: no pretrained weights are known for this configuration; '
                              "pass pretrained_cfg_overlay=dict(file='...')")
    try:
        path = local_checkpoint(source)
    except (FileNotFoundError, CheckpointError) as e:
        raise type(e)(f'{variant}: {e}') from None
    # source '' : the file, not the Hub id (timm's custom loaders skip the Hub).
    return {**overlay, 'file': path, 'custom_load': True, 'source': ''}


def _create_mpvit(variant: str, pretrained: bool = False, **kwargs) -> MPViT:
    arch = mpvit_arch(variant)
    feature_cls = kwargs.get('feature_cls')
    if isinstance(feature_cls, str) and feature_cls.lower() in ('dict', 'list'):
        # timm's FeatureDictNet runs the top-level modules in order; MPViT's checkpoint layout keeps all
        # patch embeddings, then all stages, which run interleaved.
        raise InvalidInputError(f"{variant}: feature_cls={feature_cls!r} needs the stages as one sequence of "
                                "top-level modules, which MPViT's checkpoint layout is not; use the default "
                                "('getter'), 'hook' or 'fx'")
    out_indices = kwargs.get('out_indices')
    named = isinstance(out_indices, (list, tuple)) and any(isinstance(i, str) for i in out_indices)
    if named and not (feature_cls is None or isinstance(feature_cls, type) and issubclass(feature_cls, MPViTFeatures)):
        raise InvalidInputError(f'{variant}: out_indices {tuple(out_indices)} names stem levels, which only the '
                                f'default feature class gives (feature_cls={feature_cls!r} takes stage indices)')
    if pretrained:
        kwargs['pretrained_cfg_overlay'] = _pretrained_source(variant, kwargs)
    return build_model_with_cfg(
        MPViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls=MPViTFeatures),  # timm takes out_indices= over this
        **dict(arch, **kwargs),
    )


def _cfg(name: str, **kwargs) -> Dict:
    """A released ImageNet checkpoint's pretrained cfg; its sources and license come from ``model_zoo.json``."""
    entry = model_zoo.get(name)
    return {
        'url': entry.url,
        'hf_hub_id': entry.hf_hub_id,  # set once the weights are on the Hub (tools/export_hub.py)
        'license': model_zoo.weights_license()['id'],  # the authors' MPViT LSA (see model_zoo.json)
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,  # the authors evaluate with Resize(256) + CenterCrop(224), bicubic
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv',
        'classifier': 'cls_head.cls',
        'custom_load': True,  # MPViT.load_pretrained: the checks of mpvit.checkpoint, as every other loader
        'paper_ids': 'arXiv:2112.11010',
        'paper_name': 'MPViT: Multi-Path Vision Transformer for Dense Prediction',
        'origin_url': 'https://github.com/youngwanLEE/MPViT',
        **kwargs,
    }


# The authors' ImageNet-1k weights (DeiT recipe, 300 epochs); top-1 78.2 / 80.9 / 83.0 / 84.3.
default_cfgs = generate_default_cfgs({
    f'{name}.in1k': _cfg(name) for name in ('mpvit_tiny', 'mpvit_xsmall', 'mpvit_small', 'mpvit_base')
})


@register_model
def mpvit_tiny(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-T: 5.8M params, 1.6 GFLOPs at 224."""
    return _create_mpvit('mpvit_tiny', pretrained=pretrained, **kwargs)


@register_model
def mpvit_xsmall(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-XS: 10.5M params, 2.9 GFLOPs at 224."""
    return _create_mpvit('mpvit_xsmall', pretrained=pretrained, **kwargs)


@register_model
def mpvit_small(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-S: 22.8M params, 4.7 GFLOPs at 224."""
    return _create_mpvit('mpvit_small', pretrained=pretrained, **kwargs)


@register_model
def mpvit_base(pretrained: bool = False, **kwargs) -> MPViT:
    """MPViT-B: 74.8M params, 16.4 GFLOPs at 224."""
    return _create_mpvit('mpvit_base', pretrained=pretrained, **kwargs)
