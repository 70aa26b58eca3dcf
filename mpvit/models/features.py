"""MPViT as a feature extractor: :class:`MPViTFeatures` (timm's ``features_only`` class for it) and
:func:`create_features`, the one builder behind every adapter (Detectron2, mmsegmentation, Deformable DETR).

Every adapter takes the same arguments under the same names (``model_name``, ``out_indices``,
``in_chans``, ``norm_layer``, ``drop_path_rate``, ``fast_ops``, ``batch_paths``) and hands them to
:func:`create_features`; what differs is only how each framework spells a norm layer, which the
adapter turns into a factory first. An adapter keeps the built core model at its own ``backbone``
attribute (``features.model``), where the released checkpoints put it.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models import FeatureInfo

from mpvit.errors import InvalidInputError, first_few

from .batched_paths import set_batch_paths
from .mpvit import MPVIT_ARCHS, Level, MPViT, NormLayer, check_levels, mpvit_arch

__all__ = ['MPViTFeatures', 'create_features', 'renamed_arguments', 'resolve_arch']

_ARCH_KEYS = frozenset(next(iter(MPVIT_ARCHS.values())))


def resolve_arch(model_name: Union[str, Mapping[str, Any]], option: str = 'model_name') -> Dict[str, Any]:
    """MPViT's architecture arguments for a variant name (``'mpvit_small'``, timm's names; the short
    ``'small'`` too) or a dict of those arguments (``num_path``, ``num_layers``, ``embed_dims``,
    ``mlp_ratio``); anything else is one line naming ``option``."""
    if isinstance(model_name, str):
        try:
            return mpvit_arch(model_name)
        except ValueError as e:
            raise InvalidInputError(f'{option} {e}') from None
    if isinstance(model_name, Mapping):
        unknown = sorted(set(model_name) - _ARCH_KEYS)
        if unknown:
            raise InvalidInputError(f'{option} has unknown keys {first_few(unknown)}; '
                                    f'MPViT takes {", ".join(sorted(_ARCH_KEYS))}')
        return dict(model_name)
    raise InvalidInputError(f'{option} {model_name!r}: expected a variant name such as mpvit_small, '
                            'or a dict of MPViT arguments')


def renamed_arguments(owner: str, given: Mapping[str, Any], renames: Mapping[str, str],
                      current: Mapping[str, Any]) -> Dict[str, Any]:
    """``current`` (the new names' values; ``None``: not set) with the former names in ``given`` moved to the
    new ones, and one ``FutureWarning``, so that configs written before the one adapter face still build.

    An old and a new name both set to different values is one line naming both (neither is taken silently);
    any other unknown name is a ``TypeError``, as Python gives.
    """
    unknown = [name for name in given if name not in renames]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument '{unknown[0]}'")
    merged = dict(current)
    for old, value in given.items():
        new = renames[old]
        if merged.get(new) is not None and merged[new] != value:
            raise InvalidInputError(f'{owner}: {old}={value!r} and {new}={merged[new]!r} are both set (a former '
                                    f'name over a config that uses the new one?); {old!r} is now {new!r}: set '
                                    f'that one only')
        merged[new] = value
    warnings.warn(f'{owner}: ' + ', '.join(f'{old!r} is now {renames[old]!r}' for old in given), FutureWarning,
                  stacklevel=3)
    return merged


class MPViTFeatures(nn.Module):
    """The maps of MPViT at ``out_indices``: timm's ``features_only`` class for MPViT, and what
    :func:`create_features` gives every adapter.

    Does what timm's getter wrapper does (the maps from ``forward_intermediates``; with ``prune``,
    the unused stages and the head removed), and keeps the model's own methods that a feature
    extractor needs: ``fuse()`` for inference and ``set_grad_checkpointing``. Keys stay
    ``model.<classification key>``, as with timm's wrappers.

    Args:
        model: the core model.
        out_indices: stage indices 0..3 (strides 4..32; timm's rules: an int n is the last n stages,
            negatives count from the end), and the stem maps by name, ``'stem.0'`` (stride 2) and
            ``'stem.1'`` (stride 4), which come first: ``feature_info`` describes the maps in that order.
        out_map, return_dict: timm's getter-wrapper arguments; not supported (a list is returned).
        output_fmt: ``'NCHW'`` only.
        norm: timm's argument; MPViT has no final norm over its maps, so they are the same either way.
        prune: remove what the levels do not need (timm's ``features_only``); ``False`` keeps every stage,
            so that a whole checkpoint still loads key for key (the adapters).
    """

    def __init__(self, model: MPViT, out_indices: Union[int, Sequence[Level]] = (0, 1, 2, 3),
                 out_map: Optional[Sequence] = None, return_dict: bool = False, output_fmt: str = 'NCHW',
                 norm: bool = False, prune: bool = True):
        super().__init__()
        if output_fmt != 'NCHW':
            raise InvalidInputError(f"output_fmt={output_fmt!r}: MPViT's stage maps are NCHW")
        if out_map is not None or return_dict:  # timm's getter wrapper takes them but does not support them either
            raise InvalidInputError('features_only MPViT returns a list of maps: out_map / return_dict are not '
                                    "supported (use feature_cls='hook' for a dict)")
        names, stage_indices = check_levels(out_indices, len(model.mhca_stages))
        levels = model.feature_levels(out_indices)
        if prune:  # its indices in the given order; the maps come by depth
            model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        if names:  # the levels in output order (timm's FeatureInfo indexes a list of them)
            self.feature_info = FeatureInfo(levels, tuple(range(len(levels))))
        else:
            self.feature_info = FeatureInfo(model.feature_info, stage_indices)
        self.model = model
        self.out_indices = names + list(stage_indices)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm, intermediates_only=True)

    @torch.no_grad()
    def fuse(self) -> MPViTFeatures:
        """:meth:`MPViT.fuse` of the wrapped model (in place; returns self)."""
        self.model.fuse()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def create_features(
        model_name: Union[str, Mapping[str, Any]] = 'mpvit_small',
        out_indices: Union[int, Sequence[Level]] = (0, 1, 2, 3),
        *,
        in_chans: int = 3,
        norm_layer: Optional[NormLayer] = None,
        drop_path_rate: float = 0.,
        fast_ops: bool = True,
        batch_paths: str = 'auto',
) -> MPViTFeatures:
    """A headless MPViT returning the maps at ``out_indices``, built as every adapter builds it.

    Every stage is kept whatever ``out_indices`` says (``prune=False``), so any released checkpoint
    loads key for key.

    Args:
        model_name: the variant, ``'mpvit_tiny'`` | ``'mpvit_xsmall'`` | ``'mpvit_small'`` | ``'mpvit_base'``
            (timm's names; ``'small'`` ... too), or a dict of MPViT's architecture arguments.
        out_indices: see :class:`MPViTFeatures`.
        in_chans: input image channels (a checkpoint's stem is adapted on loading).
        norm_layer: factory ``(channels) -> module`` for every conv-path norm; BatchNorm2d by default.
        drop_path_rate: stochastic depth.
        fast_ops: ``False`` builds the textbook ops, what FLOP counting needs.
        batch_paths: ``'always'`` installs the batched execution of each stage's paths
            (:func:`mpvit.set_batch_paths`); ``'auto'`` / ``'never'``: path by path.
    """
    core = MPViT(**resolve_arch(model_name), in_chans=in_chans, num_classes=0, global_pool='',
                 drop_path_rate=drop_path_rate, norm_layer=norm_layer or nn.BatchNorm2d, fast_ops=fast_ops)
    set_batch_paths(core, batch_paths)
    return MPViTFeatures(core, out_indices, prune=False)
