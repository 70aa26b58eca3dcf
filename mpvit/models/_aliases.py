"""The state-dict hooks behind the reference's ``cpe`` / ``crpe`` aliases.

The reference registers each encoder's shared CPE / CRPE under several names
(``crpe.*``, and ``cpe.*`` / ``crpe.*`` / ``factoratt_crpe.crpe.*`` in every
layer), and released checkpoints hold every one of those keys. The model keeps
that layout; these hooks, registered by :class:`mpvit.models.mpvit.MHCAEncoder`,
make a state dict safe to save (no two keys share memory) and loading one take
an edit of the encoder's own key. Torch only: the network file imports this
module, and nothing of the weights code.
"""
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['copy_shared_aliases', 'resolve_alias_copies']

# Alias copies handed out by state_dict(), by id: (a weak reference, the version counter then, the values
# then). A copy that comes back unchanged stands for "the shared tensor", as it would have with shared memory.
# The values catch edits that bypass the version counter (.data, .numpy()); the tensors are small.
_ALIAS_COPIES: Dict[int, Tuple['weakref.ref[torch.Tensor]', int, torch.Tensor]] = {}


def _remember_copy(copy: torch.Tensor) -> None:
    if copy.is_inference() or copy.device.type == 'meta':  # no version counter / no values to compare
        return
    key = id(copy)
    _ALIAS_COPIES[key] = (weakref.ref(copy, lambda _: _ALIAS_COPIES.pop(key, None)), copy._version, copy.clone())


def _is_unchanged_copy(value: object) -> bool:
    entry = _ALIAS_COPIES.get(id(value))
    return (entry is not None and entry[0]() is value and entry[1] == value._version
            and torch.equal(entry[2], value))


def _alias_of(relative_key: str) -> Optional[str]:
    """The encoder's own key for an alias key (``MHCA_layers.3.factoratt_crpe.crpe.conv_list.0.weight`` ->
    ``crpe.conv_list.0.weight``), or None for a key that is no alias."""
    parts = relative_key.split('.')
    if parts[0] != 'MHCA_layers':
        return None
    for i, part in enumerate(parts):
        if part in ('cpe', 'crpe'):
            return '.'.join(parts[i:])
    return None


def copy_shared_aliases(module: nn.Module, state_dict: Dict, prefix: str, local_metadata: Dict) -> None:
    """State-dict post-hook: each layer's ``cpe.*``, ``crpe.*`` and ``factoratt_crpe.crpe.*`` keys (the
    encoder's own tensors under the reference's alias names) hold copies, so that no two keys of a state
    dict share memory.

    The released checkpoints keep the aliases, and so do ours, key for key; safetensors (timm's
    ``save_for_hf``, transformers' ``save_pretrained``) refuses tensors that share memory. With
    ``keep_vars=True`` the parameters themselves are kept.
    """
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict[key]
        if _alias_of(key[len(prefix):]) is not None and not isinstance(value, nn.Parameter):
            copy = value.clone()
            _remember_copy(copy)
            state_dict[key] = copy


def resolve_alias_copies(module: nn.Module, state_dict: Dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: loading writes every key of the shared modules in module order (encoder
    key, then each layer's alias), the last one winning, as in the reference. An alias that is an unchanged
    copy from :func:`copy_shared_aliases` is replaced by the value written before it, as the shared tensor
    it stands for would be: changing only the encoder's key of a ``state_dict()`` then loads that change."""
    written: Dict[str, torch.Tensor] = {}
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
    for relative in names:
        key = prefix + relative
        if key not in state_dict:
            continue
        value = state_dict[key]
        own = _alias_of(relative) or relative
        if own in written and _is_unchanged_copy(value):
            state_dict[key] = written[own]
        else:
            written[own] = value

