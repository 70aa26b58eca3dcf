"""MPViT as an mmsegmentation 1.x backbone (``type='MPViT'`` in a config), registered with
``mmseg.registry.MODELS`` on import.

Like every adapter of this repository, the backbone *wraps* the core model (its ``backbone`` attribute, as in
Detectron2's ``D2MPViT``), but its state dict shows the core model's keys with no name of their own, both
ways: a segmentor's ``backbone.*`` keys are the classification checkpoint's keys, as in the released UperNet
checkpoints (``backbone.stem.0.conv.weight``). torch's public state-dict hooks do it, so ``state_dict()``,
``load_state_dict()``, mmengine's ``load_checkpoint`` / ``load_from`` / resume, and checkpoints the Runner
saves all use those keys. Module paths (``named_parameters()``, ``named_modules()``) keep the attribute:
``backbone.backbone.stem...`` in a segmentor.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_norm_layer
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit, initialize
from mmseg.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from mpvit.checkpoint import load_backbone_weights
from mpvit.errors import InvalidInputError
from mpvit.models.features import create_features, renamed_arguments, resolve_arch

_CORE = 'backbone.'  # the attribute holding the core model, as a key prefix


def _flat_state_dict(module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict) -> None:
    """state_dict post-hook: the core model's keys moved up to the wrapper's own prefix (in place, keeping
    their order: they are the last keys written)."""
    nested = prefix + _CORE
    for key in [k for k in state_dict if k.startswith(nested)]:
        state_dict[prefix + key[len(nested):]] = state_dict.pop(key)


def _nest_loaded_keys(module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict,
                      strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                      error_msgs: List[str]) -> None:
    """load_state_dict pre-hook: every key under the wrapper goes to the core model (the wrapper has no
    tensors of its own); the post-hook names missing and unexpected keys back as they were given."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _CORE + key[len(prefix):]] = state_dict.pop(key)
    module._loading_prefix = prefix


def _flat_incompatible_keys(module: torch.nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: missing / unexpected keys of the core model under the flat names."""
    prefix = getattr(module, '_loading_prefix', None)
    if prefix is None:
        return
    nested = prefix + _CORE
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + k[len(nested):] if k.startswith(nested) else k for k in keys]
    del module._loading_prefix


def _pretrained_checkpoint(init_cfg: Any) -> Tuple[Optional[str], List[Dict]]:
    """The checkpoint of a ``Pretrained`` init_cfg (if any) and the other init configs."""
    cfgs = list(init_cfg) if isinstance(init_cfg, (list, tuple)) else [init_cfg] if init_cfg else []
    pretrained = [c for c in cfgs if c.get('type') in ('Pretrained', PretrainedInit)]
    others = [c for c in cfgs if c not in pretrained]
    if not pretrained:
        return None, others
    checkpoint = pretrained[-1].get('checkpoint')
    if len(pretrained) > 1 or not checkpoint:
        raise InvalidInputError('model.backbone.init_cfg: one Pretrained entry with a checkpoint is expected, got '
                                f'{pretrained}')
    return str(checkpoint), others


_RENAMED = dict(arch='model_name', norm_cfg='norm_layer', in_channels='in_chans')


@MODELS.register_module(name='MPViT')
class MMSegMPViT(BaseModule):
    """MPViT backbone returning the stage maps at ``out_indices`` (strides 4, 8, 16, 32), and the stem's maps
    ``'stem.0'`` (stride 2) / ``'stem.1'`` (stride 4) where named there (they come first).

    Takes the arguments every adapter takes (:func:`mpvit.models.create_features`), under the same names;
    the former ``arch`` / ``norm_cfg`` / ``in_channels`` still work, with a ``FutureWarning`` (a former and a
    new name set to different values is one line naming both).

    Args:
        model_name: the variant, ``'mpvit_tiny'`` | ``'mpvit_xsmall'`` | ``'mpvit_small'`` (the default) |
            ``'mpvit_base'`` (timm's names; the short ``'small'`` ... are accepted too), or a dict of MPViT's
            own arguments (``num_path``, ``num_layers``, ``embed_dims``, ``mlp_ratio``).
        out_indices: stages to return (0..3), and stem maps by name (``('stem.0', 0, 1, 2, 3)``).
        in_chans: input image channels (3 by default).
        norm_layer: mmcv norm config for the conv paths (``dict(type='SyncBN', requires_grad=True)``, BN,
            GN ...), or a factory ``(channels) -> module``.
        drop_path_rate: stochastic depth.
        fast_ops: False builds the textbook ops, what FLOP counting needs
            (``get_flops.py ... --cfg-options model.backbone.fast_ops=False``).
        batch_paths: ``'always'`` runs each stage's transformer paths as one batch
            (:func:`mpvit.set_batch_paths`); ``'auto'``: path by path.
        norm_eval: keep BN layers in eval mode (frozen statistics) while training.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` takes a classification checkpoint
            or a released segmentation / detection checkpoint (its backbone part, found whatever its
            prefix: ``prefix`` is not needed), read by :func:`mpvit.checkpoint.load_backbone_weights`.
    """

    def __init__(
            self,
            model_name: Union[str, Dict, None] = None,
            out_indices: Union[int, Sequence[Union[int, str]]] = (0, 1, 2, 3),
            *,
            in_chans: Optional[int] = None,
            norm_layer: Union[Dict, Callable[[int], torch.nn.Module], None] = None,
            drop_path_rate: float = 0.,
            fast_ops: bool = True,
            batch_paths: str = 'auto',
            norm_eval: bool = False,
            init_cfg: Optional[Union[Dict, List[Dict]]] = None,
            **renamed: Any,
    ):
        super().__init__(init_cfg=init_cfg)
        option = 'model.backbone.model_name'
        if renamed:  # a config written before the one adapter face
            given = renamed_arguments('model.backbone (MPViT)', renamed, _RENAMED,
                                      dict(model_name=model_name, norm_layer=norm_layer, in_chans=in_chans))
            model_name, norm_layer, in_chans = given['model_name'], given['norm_layer'], given['in_chans']
            option = 'model.backbone.arch' if 'arch' in renamed else option
        model_name = 'mpvit_small' if model_name is None else model_name
        in_chans = 3 if in_chans is None else in_chans
        if norm_layer is None or isinstance(norm_layer, Mapping):
            norm_cfg = dict(norm_layer or dict(type='BN', requires_grad=True))
            norm_layer = lambda channels: build_norm_layer(norm_cfg, channels)[1]  # noqa: E731
        features = create_features(
            resolve_arch(model_name, option=option), out_indices, in_chans=in_chans,
            norm_layer=norm_layer, drop_path_rate=drop_path_rate, fast_ops=fast_ops, batch_paths=batch_paths,
        )
        self.backbone = features.model
        self.model_name = model_name  # what was built, for the evaluation record
        self.out_indices = out_indices if isinstance(out_indices, int) else tuple(out_indices)
        self._levels = features.out_indices
        self._channels = features.feature_info.channels()
        self.norm_eval = norm_eval
        self.register_state_dict_post_hook(_flat_state_dict)
        self.register_load_state_dict_pre_hook(_nest_loaded_keys)
        self.register_load_state_dict_post_hook(_flat_incompatible_keys)

    def init_weights(self) -> None:
        """A ``Pretrained`` init_cfg goes through the one extractor of every released format (mmengine's
        ``PretrainedInit`` would need the keys' prefix and would load non-strictly); any other init_cfg is
        mmengine's."""
        checkpoint, others = _pretrained_checkpoint(self.init_cfg)
        if checkpoint is None:
            super().init_weights()
            return
        if self.is_init:
            print_log('MPViT: init_weights called again; the pretrained weights are loaded already',
                      logger='current', level=30)
            return
        if others:
            initialize(self, others)
        print_log(f'MPViT: loading backbone weights from {checkpoint}', logger='current')
        load_backbone_weights(self.backbone, checkpoint)
        self.is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.backbone.forward_intermediates(x, indices=self._levels, intermediates_only=True))

    def train(self, mode: bool = True) -> MMSegMPViT:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned maps, in their order (a decode head's ``in_channels``)."""
        return list(self._channels)
