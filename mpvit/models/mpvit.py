"""MPViT: Multi-Path Vision Transformer for Dense Prediction (Lee et al., CVPR 2022).

One model file for every framework in this repository. Module and parameter
names follow the released checkpoints exactly (``stem``, ``patch_embed_stages``,
``mhca_stages``, ``cls_head``), including the reference's habit of registering
each encoder's shared ``cpe`` / ``crpe`` under several names: state dicts keep
those aliases, so released checkpoints load key for key.

Inside a transformer path the tokens are kept as ``[B, H, W, C]``. That is
both the token layout LayerNorm / Linear want and a channels-last image, so
the convolutional position encodings see the same memory through a permuted
view instead of reshaping tokens to maps and back around every conv (the
maps are channels-last from the stem on).

The model is bound by memory traffic, not arithmetic, so several ops are
written in a faster but equivalent form. Each module that has one decides at
build time (a ``torch.jit.Final`` flag, ``fast_ops=True`` by default); the
textbook form is what tests compare with, what FLOP counts need (the fast
forms add multiply-by-zero work) and what ``set_fast_ops(model, False)``
switches back to. Tracing runs whichever form the flags say.
``MPViT.fuse()`` re-parameterises a model for inference.

Beside it: ``entrypoints/mpvit.py`` (timm registration, pretrained configs), ``_aliases.py``
(the alias keys' state-dict hooks) and ``batched_paths.py`` (a stage's paths as
one batch: opt-in, installed by ``mpvit.set_batch_paths``).

Paper: https://arxiv.org/abs/2112.11010
"""

from contextlib import nullcontext
from typing import Callable, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, fast_layer_norm, register_notrace_module, trunc_normal_
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models import checkpoint
from timm.models._features import feature_take_indices  # private (no public export): tests/test_dependencies.py
from torch.nn.utils.fusion import fuse_conv_bn_weights

from mpvit.errors import CheckpointError, InvalidInputError

from ._aliases import copy_shared_aliases, resolve_alias_copies

__all__ = ['MPViT', 'MPVIT_ARCHS', 'STEM_LEVELS', 'check_levels', 'find_mpvit', 'fold_batchnorm', 'mpvit_arch',
           'set_fast_ops']

NormLayer = Callable[[int], nn.Module]
Level = Union[int, str]

# The stem's two maps (stride 2, stride 4) by their module names: levels of their own beside the stage indices
# 0..3 (strides 4..32), so that every out_indices in use keeps its meaning, negative ones included.
STEM_LEVELS = ('stem.0', 'stem.1')

# paths, layers, widths, mlp ratio and heads per stage: the paper's Table 1, as the authors' model file builds them.
MPVIT_ARCHS: Dict[str, Dict] = {
    'tiny': dict(num_path=(2, 3, 3, 3), num_layers=(1, 2, 4, 1), embed_dims=(64, 96, 176, 216), mlp_ratio=2.),
    'xsmall': dict(num_path=(2, 3, 3, 3), num_layers=(1, 2, 4, 1), embed_dims=(64, 128, 192, 256), mlp_ratio=4.),
    'small': dict(num_path=(2, 3, 3, 3), num_layers=(1, 3, 6, 3), embed_dims=(64, 128, 216, 288), mlp_ratio=4.),
    'base': dict(num_path=(2, 3, 3, 3), num_layers=(1, 3, 8, 3), embed_dims=(128, 224, 368, 480), mlp_ratio=4.),
}


def check_levels(out_indices: Optional[Union[int, Sequence[Level]]], num_stages: int = 4,
                 option: str = 'out_indices') -> Tuple[List[str], List[int]]:
    """The stem maps and the stage indices that ``out_indices`` names, in the order the maps come (the stem
    first, the stages by depth), or one line saying what is wrong with it.

    Stage indices follow timm (an int n is the last n stages, negatives count from the end; ``None``: all).
    ``option`` names the argument in errors.
    """
    shown = tuple(out_indices) if isinstance(out_indices, (list, tuple)) else out_indices
    levels = f'levels are stage indices 0..{num_stages - 1} (or an int n, the last n stages) and the stem maps ' \
             f'{", ".join(STEM_LEVELS)}'
    if isinstance(out_indices, (list, tuple)):
        unknown = [i for i in out_indices if isinstance(i, str) and i not in STEM_LEVELS]
        if unknown or not out_indices:
            what = f'no level {unknown[0]!r}' if unknown else 'no level named'
            raise InvalidInputError(f'{option} {shown!r}: {what}; {levels}')
        names = [i for i in out_indices if isinstance(i, str)]
        numbers = [i for i in out_indices if not isinstance(i, str)]
    else:
        names, numbers = [], out_indices
    try:
        take = feature_take_indices(num_stages, numbers)[0] if numbers != [] else []
    except (AssertionError, TypeError):  # timm's range asserts
        raise InvalidInputError(f'{option} {shown!r}: {levels}') from None
    if len(set(take)) != len(take) or len(set(names)) != len(names):
        raise InvalidInputError(f'{option} {shown!r} names a level twice')
    return [n for n in STEM_LEVELS if n in names], sorted(take)


def mpvit_arch(name: str) -> Dict:
    """The architecture arguments of a variant named ``mpvit_small`` or ``small`` (every adapter's resolver);
    ``ValueError`` naming the choices otherwise."""
    key = name[len('mpvit_'):] if name.startswith('mpvit_') else name
    if key not in MPVIT_ARCHS:
        choices = ', '.join('mpvit_' + k for k in MPVIT_ARCHS)
        raise InvalidInputError(f'{name!r} is not an MPViT variant; choose from {choices}')
    return MPVIT_ARCHS[key]


def _conv_normal_init(conv: nn.Conv2d) -> None:
    """He-normal over fan-out, the reference's init for every conv of its conv-BN blocks."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, (2.0 / fan_out) ** 0.5)


def _init_norm(norm: nn.Module) -> None:
    if getattr(norm, 'weight', None) is not None:
        nn.init.ones_(norm.weight)
    if getattr(norm, 'bias', None) is not None:
        nn.init.zeros_(norm.bias)


def fold_batchnorm(conv: nn.Conv2d, norm: nn.Module) -> Optional[nn.Conv2d]:
    """``conv`` followed by an inference-mode batch norm, as one conv with a bias.

    Works for any norm with running statistics (BatchNorm2d, SyncBatchNorm,
    Detectron2's FrozenBatchNorm2d); returns None for norms that use the
    statistics of their input (GroupNorm, or batch norm without running stats).
    """
    stats = [getattr(norm, name, None) for name in ('running_mean', 'running_var', 'weight', 'bias')]
    if any(t is None for t in stats):
        return None
    mean, var, gamma, beta = stats
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, mean, var, norm.eps, gamma, beta)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    return fused


class Conv2dBN(nn.Module):
    """Conv (no bias) -> norm -> optional activation (``conv``, ``bn`` in checkpoints).

    Args:
        in_chs, out_chs, kernel_size, stride, padding: the conv's.
        norm_layer: factory ``(num_channels) -> module`` of the norm (BatchNorm2d by default).
        act_layer: activation factory, or None for none.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            padding: int = 0,
            norm_layer: NormLayer = nn.BatchNorm2d,
            act_layer: Optional[Callable[[], nn.Module]] = None,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, bias=False)
        self.bn = norm_layer(out_chs)
        self.act_layer = act_layer() if act_layer is not None else nn.Identity()
        _conv_normal_init(self.conv)
        _init_norm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_layer(self.bn(self.conv(x)))

    def reparameterize(self) -> None:
        fused = fold_batchnorm(self.conv, self.bn)
        if fused is not None:
            self.conv, self.bn = fused, nn.Identity()


class DWConv2dBN(nn.Module):
    """Depthwise kxk -> pointwise 1x1 -> norm -> Hardswish: one step of a patch-embedding chain.

    Args:
        in_chs, out_chs: channels (the depthwise conv has ``out_chs`` groups).
        kernel_size, stride: the depthwise conv's (padding keeps the size at stride 1).
        norm_layer: factory ``(num_channels) -> module`` of the norm (BatchNorm2d by default).
        act_layer: activation factory.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            norm_layer: NormLayer = nn.BatchNorm2d,
            act_layer: Callable[[], nn.Module] = nn.Hardswish,
    ):
        super().__init__()
        self.dwconv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=out_chs, bias=False)
        self.pwconv = nn.Conv2d(out_chs, out_chs, 1, bias=False)
        self.bn = norm_layer(out_chs)
        self.act = act_layer()
        _conv_normal_init(self.dwconv)
        _conv_normal_init(self.pwconv)
        _init_norm(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pwconv(self.dwconv(x))))

    def reparameterize(self) -> None:
        fused = fold_batchnorm(self.pwconv, self.bn)
        if fused is not None:
            self.pwconv, self.bn = fused, nn.Identity()


class DWCPatchEmbed(nn.Module):
    """One patch embedding (``patch_conv`` in checkpoints): a depthwise-separable 3x3 conv-BN.

    Args:
        dim: channels in and out.
        stride: 2 for the first embedding of a downsampling stage, else 1.
        norm_layer: factory ``(num_channels) -> module`` of the norm (BatchNorm2d by default).
    """

    def __init__(self, dim: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.patch_conv = DWConv2dBN(dim, dim, 3, stride, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_conv(x)


class PatchEmbedStage(nn.Module):
    """Multi-scale patch embedding: a chain of 3x3 convs, one output kept per path.

    Path j sees j + 1 stacked 3x3 convs (receptive field 3, 5, 7, ...), which is
    how the paper gets coarse-to-fine token scales at equal sequence length.

    Args:
        dim: channels in and out.
        num_path: paths (outputs).
        downsample: stride 2 in the first conv (every stage but the first).
        norm_layer: factory ``(num_channels) -> module`` of the norm (BatchNorm2d by default).
    """

    def __init__(self, dim: int, num_path: int, downsample: bool, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.patch_embeds = nn.ModuleList([
            DWCPatchEmbed(dim, stride=2 if downsample and idx == 0 else 1, norm_layer=norm_layer)
            for idx in range(num_path)
        ])

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outputs = []
        for embed in self.patch_embeds:
            x = embed(x)
            outputs.append(x)
        return outputs


def set_fast_ops(model: nn.Module, enable: bool = True) -> nn.Module:
    """Set every MPViT module inside ``model`` (a classifier, a detector, a segmentor) to the fast
    formulation of its ops, or with ``enable=False`` to the textbook one; returns ``model``.

    The textbook ops are what FLOP counters must trace: the fast ones add multiply-by-zero work
    (zero-padded kernels, off-diagonal head blocks) that a count would include. Call it before
    ``torch.jit.script`` / ``torch.compile``, which take the flags as constants.
    """
    for module in model.modules():
        if isinstance(getattr(module, 'fast_ops', None), bool):  # the modules with a fast form of their ops
            module.fast_ops = enable
    return model


@register_notrace_module  # fx leaf: fast_layer_norm asks for the autocast state, which a symbolic trace cannot
class LayerNorm(TimmLayerNorm):
    """timm's LayerNorm with its fast-norm choice made per module (``fast_ops``) instead of by timm's global.

    Fast, it stays in the autocast dtype: native CUDA autocast runs LayerNorm in
    float32, which writes a float32 copy of the tokens only for the next Linear
    to cast it back. The kernel accumulates in float32 either way.

    Args:
        dim: normalised width.
        eps: added to the variance.
        fast_ops: the autocast-dtype kernel (True) or the textbook ``F.layer_norm``.
    """

    fast_ops: Final[bool]

    def __init__(self, dim: int, eps: float = 1e-6, fast_ops: bool = True):
        super().__init__(dim, eps=eps)
        self.fast_ops = fast_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # no autocast state to ask for (fast_layer_norm would do the same)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if self.fast_ops and torch.amp.is_autocast_available(x.device.type):  # not on 'meta', say
            return fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs products in on ``x``'s device, or None outside autocast."""
    if torch.jit.is_scripting():  # TorchScript cannot ask for the autocast state
        return None
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax in the autocast dtype (float32 accumulation inside), for the same reason as LayerNorm."""
    dtype = _autocast_dtype(x)
    if torch.jit.is_scripting() or dtype is None:
        return x.softmax(dim)
    with torch.autocast(x.device.type, enabled=False):
        return x.to(dtype).softmax(dim)


@register_notrace_module  # fx leaf: its shape arithmetic is not symbolic (timm's feature_cls='fx')
class ConvPosEnc(nn.Module):
    """Convolutional position encoding: x + depthwise3x3(x) on ``[B, H, W, C]`` tokens.

    The residual is folded into the kernel (+1 at the centre tap), which is the
    same sum in one pass over memory instead of a conv and an add.

    Args:
        dim: channels.
        kernel_size: of the depthwise conv.
        fast_ops: the residual in the kernel (True) or a conv and an add.
    """
    fast_ops: Final[bool]

    def __init__(self, dim: int, kernel_size: int = 3, fast_ops: bool = True):
        super().__init__()
        self.fast_ops = fast_ops
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        self.residual_in_kernel = False  # set by reparameterize(): the +1 is then stored in proj.weight

    def _identity_tap(self, weight: torch.Tensor) -> torch.Tensor:
        centre = self.proj.kernel_size[0] // 2
        weight = weight.clone()
        weight[:, :, centre, centre] += 1
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = x.permute(0, 3, 1, 2)
        if self.residual_in_kernel:
            return self.proj(feat).permute(0, 2, 3, 1)
        if not self.fast_ops:
            return (self.proj(feat) + feat).permute(0, 2, 3, 1)
        weight = self._identity_tap(self.proj.weight)
        out = F.conv2d(feat, weight, self.proj.bias, padding=self.proj.padding, groups=self.proj.groups)
        return out.permute(0, 2, 3, 1)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not self.residual_in_kernel:
            self.proj.weight.copy_(self._identity_tap(self.proj.weight))
            self.residual_in_kernel = True


@register_notrace_module  # fx leaf: its shape arithmetic is not symbolic (timm's feature_cls='fx')
class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding (CoaT): q * depthwise_conv(v).

    Heads are split into groups that use different kernel sizes
    (``window`` maps kernel size -> number of heads). The groups run as one
    depthwise conv whose smaller kernels are zero-padded to the largest size:
    the same math, without splitting and re-concatenating the channels.

    Args:
        head_dim: channels per head.
        num_heads: heads, all covered by ``window``.
        window: kernel size -> heads that use it (the reference's ``{3: 2, 5: 3, 7: 3}``).
        fast_ops: one zero-padded conv (True) or one conv per group.
    """
    fast_ops: Final[bool]

    def __init__(self, head_dim: int, num_heads: int, window: Dict[int, int], fast_ops: bool = True):
        super().__init__()
        self.fast_ops = fast_ops
        if sum(window.values()) != num_heads:
            raise ValueError(f'CRPE window {window} does not cover {num_heads} heads')
        self.channel_splits = [heads * head_dim for heads in window.values()]
        self.conv_list = nn.ModuleList([
            nn.Conv2d(chs, chs, kernel_size, 1, kernel_size // 2, groups=chs)
            for kernel_size, chs in zip(window, self.channel_splits)
        ])

    def max_kernel_size(self) -> int:
        """The largest kernel of the groups."""
        k_max = 0
        for conv in self.conv_list:
            k_max = max(k_max, conv.kernel_size[0])
        return k_max

    def padded_kernels(self, k_max: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Each group's kernel zero-padded to ``k_max``, and each group's bias."""
        weights: List[torch.Tensor] = []
        biases: List[torch.Tensor] = []
        for conv in self.conv_list:
            pad = (k_max - conv.kernel_size[0]) // 2
            weights.append(F.pad(conv.weight, [pad, pad, pad, pad]) if pad else conv.weight)
            bias = conv.bias
            if bias is not None:  # always (the convs have biases); says so to TorchScript
                biases.append(bias)
        return weights, biases

    def merged_kernel(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """All groups' kernels as one ``[C, 1, k_max, k_max]`` depthwise weight, and the bias."""
        weights, biases = self.padded_kernels(self.max_kernel_size())
        if len(weights) == 1:
            return weights[0], biases[0]
        return torch.cat(weights), torch.cat(biases)

    def conv_v(self, v: torch.Tensor) -> torch.Tensor:
        """The grouped depthwise convs on v, ``[B, H, W, C]`` in and out."""
        v_img = v.permute(0, 3, 1, 2)
        if self.fast_ops:
            weight, bias = self.merged_kernel()
            out = F.conv2d(v_img, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])
        else:
            groups = torch.split(v_img, self.channel_splits, dim=1)
            outs: List[torch.Tensor] = []
            for i, conv in enumerate(self.conv_list):
                outs.append(conv(groups[i]))
            out = torch.cat(outs, dim=1)
        return out.permute(0, 2, 3, 1)

    def forward(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, v: ``[B, H, W, C]`` (heads contiguous along C); returns q * conv(v) in that layout."""
        return q * self.conv_v(v)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Store the merged kernel as the only conv (inference; changes the state dict)."""
        if len(self.conv_list) > 1:
            weight, bias = self.merged_kernel()
            merged = nn.Conv2d(weight.shape[0], weight.shape[0], weight.shape[-1], 1, weight.shape[-1] // 2,
                               groups=weight.shape[0], device=weight.device, dtype=weight.dtype)
            merged.weight.copy_(weight)
            merged.bias.copy_(bias)
            self.conv_list = nn.ModuleList([merged])
            self.channel_splits = [weight.shape[0]]


@register_notrace_module  # fx leaf: its shape arithmetic is not symbolic (timm's feature_cls='fx')
class FactorAttnConvRelPosEnc(nn.Module):
    """Factorized attention q @ (softmax_N(k)^T @ v), plus the CRPE term.

    The fast path keeps every tensor as ``[B, N, C]`` (heads side by side) so
    that no head-major copies are made: the per-head contexts come from one
    ``[C, C]`` product of which only the diagonal ``Ch x Ch`` blocks are kept,
    and the output is one batched matmul that also adds the CRPE term. The
    extra FLOPs go to tensor cores; the copies it avoids were memory traffic,
    which is what bounds this model on a GPU.

    Args:
        dim: width.
        num_heads: heads.
        shared_crpe: the encoder's CRPE (shared by its layers; ``crpe`` in checkpoints).
        qkv_bias: bias of the q / k / v projection.
        fast_ops: the block-diagonal form (True) or the per-head einsums.
    """

    fast_ops: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            shared_crpe: ConvRelPosEnc,
            qkv_bias: bool = True,
            fast_ops: bool = True,
    ):
        super().__init__()
        self.fast_ops = fast_ops
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.crpe = shared_crpe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` tokens in and out."""
        if not self.fast_ops:
            return self.forward_per_head(x)
        b, height, width, c = x.shape
        h, n = self.num_heads, height * width
        # Three products rather than one and three strided views: q, k and v come out
        # contiguous, which the softmax and the CRPE conv would otherwise copy to get.
        q = F.linear(x, self.qkv.weight[:c], self._qkv_bias(0, c))
        k = F.linear(x, self.qkv.weight[c:2 * c], self._qkv_bias(c, 2 * c))
        v = F.linear(x, self.qkv.weight[2 * c:], self._qkv_bias(2 * c, 3 * c))
        context = torch.bmm(_softmax(k.reshape(b, n, c), dim=1).transpose(1, 2), v.reshape(b, n, c))
        # Keep only each head's own block. Out of place: an in-place write through a view is
        # dropped by torch.onnx's TorchScript exporter (silently wrong outputs).
        context = (context.view(b, h, c // h, h, c // h) * _head_mask(h, context.dtype, context.device)).view(b, c, c)
        out = torch.baddbmm(self.crpe(q, v).reshape(b, n, c), q.reshape(b, n, c), context, alpha=self.scale)
        return self.proj(out.view(b, height, width, c))

    def _qkv_bias(self, start: int, end: int) -> Optional[torch.Tensor]:
        bias = self.qkv.bias
        return None if bias is None else bias[start:end]

    def forward_per_head(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook formulation (per-head einsums), as the paper counts its FLOPs."""
        b, height, width, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, height * width, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # [b, h, n, Ch]
        context = torch.einsum('bhnk,bhnv->bhkv', k.softmax(dim=2), v)
        factor_att = torch.einsum('bhnk,bhkv->bhnv', q, context)
        q_map, v_map = (t.transpose(1, 2).reshape(b, height, width, c) for t in (q, v))
        out = self.scale * factor_att.transpose(1, 2).reshape(b, height, width, c) + self.crpe(q_map, v_map)
        return self.proj(out)


def _head_mask(num_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 on each head's own block of a ``[C, C]`` context viewed ``[B, h, Ch, h, Ch]``, else 0: exact in the
    context's dtype, so that masking writes no float32 copy; the scale goes to the next product's ``alpha``
    (applied to its float32 accumulator: not rounded to bf16 first)."""
    return torch.eye(num_heads, dtype=dtype, device=device).view(1, num_heads, 1, num_heads, 1)


class MHCALayer(nn.Module):
    """One transformer layer of a path: CPE, factorized attention, MLP (pre-norm).

    Args:
        dim: width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        drop_path: stochastic-depth rate.
        shared_cpe, shared_crpe: the encoder's position encodings.
        fast_ops: the fast forms of the ops (see :func:`set_fast_ops`).
    """
    has_drop_path: Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float,
            drop_path: float,
            shared_cpe: ConvPosEnc,
            shared_crpe: ConvRelPosEnc,
            fast_ops: bool = True,
    ):
        super().__init__()
        # Shared with the encoder and its other layers; registered here as the reference does.
        self.cpe = shared_cpe
        self.crpe = shared_crpe
        self.factoratt_crpe = FactorAttnConvRelPosEnc(dim, num_heads, shared_crpe, fast_ops=fast_ops)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.has_drop_path = drop_path > 0.
        self.norm1 = LayerNorm(dim, eps=1e-6, fast_ops=fast_ops)
        self.norm2 = LayerNorm(dim, eps=1e-6, fast_ops=fast_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe(x)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MHCAEncoder(nn.Module):
    """The transformer encoder of one path; its CPE and CRPE are shared by all its layers.

    Args:
        dim: width.
        num_layers: transformer layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        drop_path_list: stochastic-depth rate of each layer.
        crpe_window: CRPE kernel size -> heads (default: the reference's ``{3: 2, 5: 3, 7: 3}``).
        fast_ops: the fast forms of the ops (see :func:`set_fast_ops`).
    """

    def __init__(
            self,
            dim: int,
            num_layers: int,
            num_heads: int,
            mlp_ratio: float,
            drop_path_list: Sequence[float],
            crpe_window: Optional[Dict[int, int]] = None,
            fast_ops: bool = True,
    ):
        super().__init__()
        self.cpe = ConvPosEnc(dim, 3, fast_ops=fast_ops)
        self.crpe = ConvRelPosEnc(dim // num_heads, num_heads, crpe_window or {3: 2, 5: 3, 7: 3}, fast_ops=fast_ops)
        self.MHCA_layers = nn.ModuleList([
            MHCALayer(dim, num_heads, mlp_ratio, drop_path_list[idx], self.cpe, self.crpe, fast_ops=fast_ops)
            for idx in range(num_layers)
        ])
        self.grad_checkpointing = False
        self.register_state_dict_post_hook(copy_shared_aliases)  # the reference's aliases: see _aliases.py
        self.register_load_state_dict_pre_hook(resolve_alias_copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` map in, ``[B, C, H, W]`` map out (a channels-last view)."""
        x = x.permute(0, 2, 3, 1)
        for layer in self.MHCA_layers:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(layer, x)
            else:
                x = layer(x)
        return x.permute(0, 3, 1, 2)


class InvResBlock(nn.Module):
    """The local (convolutional) path: inverted residual with a depthwise 3x3.

    Args:
        dim: channels.
        norm_layer: factory ``(num_channels) -> module`` of the norm (BatchNorm2d by default).
    """

    def __init__(self, dim: int, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = Conv2dBN(dim, dim, norm_layer=norm_layer, act_layer=nn.Hardswish)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.norm = norm_layer(dim)
        self.act = nn.Hardswish()
        self.conv2 = Conv2dBN(dim, dim, norm_layer=norm_layer)
        _init_norm(self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.act(self.norm(self.dwconv(self.conv1(x))))
        return x + self.conv2(feat)

    def reparameterize(self) -> None:
        fused = fold_batchnorm(self.dwconv, self.norm)
        if fused is not None:
            self.dwconv, self.norm = fused, nn.Identity()


@register_notrace_module  # fx leaf: its shape arithmetic is not symbolic (timm's feature_cls='fx')
class MHCAStage(nn.Module):
    """One stage: a local path and one transformer path per scale, fused by a 1x1 conv.

    The paths run one by one, each through its own modules. :func:`mpvit.set_batch_paths` can install the
    batched execution (:mod:`mpvit.models.batched_paths`) on a built model: same parameters and keys.

    Args:
        dim: width of the stage's paths.
        out_dim: width after the aggregating 1x1 conv (the next stage's width).
        num_layers: transformer layers per path.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        num_path: transformer paths (one per patch-embedding scale).
        drop_path_list: stochastic-depth rate of each layer.
        norm_layer: norm factory of the conv paths.
        fast_ops: the fast forms of the ops (see :func:`set_fast_ops`).
    """
    fast_ops: Final[bool]

    def __init__(
            self,
            dim: int,
            out_dim: int,
            num_layers: int,
            num_heads: int,
            mlp_ratio: float,
            num_path: int,
            drop_path_list: Sequence[float],
            norm_layer: NormLayer = nn.BatchNorm2d,
            fast_ops: bool = True,
    ):
        super().__init__()
        self.mhca_blks = nn.ModuleList([
            MHCAEncoder(dim, num_layers, num_heads, mlp_ratio, drop_path_list, fast_ops=fast_ops)
            for _ in range(num_path)
        ])
        self.InvRes = InvResBlock(dim, norm_layer=norm_layer)
        self.aggregate = Conv2dBN(dim * (num_path + 1), out_dim, norm_layer=norm_layer, act_layer=nn.Hardswish)
        self.fast_ops = fast_ops
        self.num_heads = num_heads

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        outputs = [self.InvRes(inputs[0])]
        for i, encoder in enumerate(self.mhca_blks):
            outputs.append(encoder(inputs[i]))
        return self.aggregate(torch.cat(outputs, dim=1))


GLOBAL_POOLS = ('avg', 'max', 'avgmax', '')  # each keeps the width: pre-logits are num_features wide


class ClsHead(nn.Module):
    """timm's selectable global pool -> dropout -> Linear (``cls`` in checkpoints).

    With ``global_pool=''`` the map is not pooled and the classifier, if any, is
    applied at every position (``[B, num_classes, H, W]``), as timm's conv heads do,
    with the same ``cls.weight`` / ``cls.bias`` keys.

    Args:
        dim: input channels.
        num_classes: classifier outputs; 0 for none (pre-logits out).
        global_pool: one of ``GLOBAL_POOLS``.
        drop_rate: dropout before the classifier.
    """
    per_position: Final[bool]

    def __init__(self, dim: int, num_classes: int, global_pool: str = 'avg', drop_rate: float = 0.):
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise InvalidInputError(f'global_pool must be one of {GLOBAL_POOLS} (got {global_pool!r})')
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.per_position = not global_pool
        self.drop = nn.Dropout(drop_rate)
        self.cls = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        if pre_logits:
            return x
        if self.per_position:
            return self.cls(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.cls(x)


class MPViT(nn.Module):
    """Multi-Path Vision Transformer.

    Args:
        num_path: transformer paths per stage.
        num_layers: transformer layers per path, per stage.
        embed_dims: width of each stage (stage i outputs ``embed_dims[i + 1]``).
        mlp_ratio: MLP hidden width / width.
        num_heads: attention heads (all stages).
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for none.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over all layers of all stages.
        global_pool: timm's pool types ``'avg'``, ``'max'``, ``'avgmax'``, or ``''`` (no pooling;
            a classifier is then applied at every position).
        norm_layer: factory ``(num_channels) -> module`` for every conv-path norm
            (BatchNorm2d by default; adapters pass SyncBN / FrozenBN / GroupNorm).
        fast_ops: the faster formulations of the same function (default); ``False`` builds
            the textbook ops, e.g. for FLOP counting. ``set_fast_ops`` switches later.
        device, dtype: where and in what dtype parameters and buffers are created (timm's factory kwargs).
    """
    fast_ops: Final[bool]

    def __init__(
            self,
            num_path: Sequence[int] = (2, 3, 3, 3),
            num_layers: Sequence[int] = (1, 3, 6, 3),
            embed_dims: Sequence[int] = (64, 128, 216, 288),
            mlp_ratio: float = 4.,
            num_heads: int = 8,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: NormLayer = nn.BatchNorm2d,
            fast_ops: bool = True,
            device: Optional[Union[torch.device, str]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not len(num_path) == len(num_layers) == num_stages:
            raise ValueError('num_path, num_layers and embed_dims need one entry per stage')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.fast_ops = fast_ops

        # On the CPU also inside a caller's ``with torch.device('meta')``: the rates are Python floats.
        dpr = torch.linspace(0, drop_path_rate, sum(num_layers), device='cpu').tolist()
        stage_dpr = [dpr[sum(num_layers[:i]):sum(num_layers[:i + 1])] for i in range(num_stages)]
        out_dims = list(embed_dims[1:]) + [embed_dims[-1]]
        stem_dim = embed_dims[0] // 2
        # timm's factory kwargs: every parameter and buffer (norm_layer's too) is created on ``device``.
        with torch.device(device) if device is not None else nullcontext():
            self.stem = nn.Sequential(
                Conv2dBN(in_chans, stem_dim, 3, 2, 1, norm_layer=norm_layer, act_layer=nn.Hardswish),
                Conv2dBN(stem_dim, embed_dims[0], 3, 2, 1, norm_layer=norm_layer, act_layer=nn.Hardswish),
            )
            self.patch_embed_stages = nn.ModuleList([
                PatchEmbedStage(embed_dims[i], num_path[i], downsample=i > 0, norm_layer=norm_layer)
                for i in range(num_stages)
            ])
            self.mhca_stages = nn.ModuleList([
                MHCAStage(
                    embed_dims[i], out_dims[i], num_layers[i], num_heads, mlp_ratio, num_path[i],
                    stage_dpr[i], norm_layer=norm_layer, fast_ops=fast_ops,
                )
                for i in range(num_stages)
            ])
            self.cls_head = ClsHead(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.feature_info = [
            dict(num_chs=out_dims[i], reduction=4 * 2 ** i, module=f'mhca_stages.{i}') for i in range(num_stages)
        ]
        # Named levels (STEM_LEVELS), for dense and depth decoders that want the stride-2 map too.
        self.stem_feature_info = [dict(num_chs=stem_dim, reduction=2, module='stem.0'),
                                  dict(num_chs=embed_dims[0], reduction=4, module='stem.1')]
        self.apply(self._init_transformer_weights)
        if dtype is not None:
            self.to(dtype=dtype)

    @staticmethod
    def _init_transformer_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            _init_norm(m)

    @torch.no_grad()
    def fuse(self) -> 'MPViT':
        """Re-parameterise for inference (in place; returns self, so that timm's ``reparameterize_model``,
        which replaces each child by ``child.fuse()`` and calls the in-place ``reparameterize()`` of the
        blocks below, gives the same model).

        Every batch norm is folded into the conv before it, the CPE residual into
        its kernel, and each CRPE's kernels into one zero-padded conv, so that
        eager inference builds no kernels (a batched stage still stacks its paths'
        parameters once per forward: :mod:`mpvit.models.batched_paths`). Outputs stay the same
        up to float rounding; the state dict changes (norm keys go, conv biases
        appear, CRPE has one conv), so fuse after loading weights, not before saving.
        """
        if self.training:
            raise RuntimeError('MPViT.fuse() is for inference: call .eval() first')
        for module in list(self.modules()):  # timm's duck typing: every module that can re-parameterise itself
            if module is not self and hasattr(module, 'reparameterize'):
                module.reparameterize()
        return self

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(stem=r'^stem', blocks=r'^(?:patch_embed_stages|mhca_stages)\.(\d+)')

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's ``custom_load`` hook: any released format, the ``model`` weights of a checkpoint that also
        holds EMA ones, a classifier kept when it fits and reset with a warning when not, stem adapted to
        ``in_chans``. The weights code is imported only here, when timm asks for weights: the network does
        not depend on it."""
        from mpvit.checkpoint import load_backbone_weights

        load_backbone_weights(self, checkpoint_path, head='reset')

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, MHCAEncoder):
                module.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head.cls

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            global_pool = self.cls_head.global_pool.pool_type
        self.num_classes = num_classes
        like = self.stem[0].conv.weight  # the new head takes the model's device, dtype and mode
        with torch.device(like.device):
            head = ClsHead(self.num_features, num_classes, global_pool, self.drop_rate)
        self._init_transformer_weights(head.cls)
        self.cls_head = head.to(dtype=like.dtype).train(self.training)

    def set_fast_ops(self, enable: bool = True) -> 'MPViT':
        """Switch between the fast and the textbook formulation of every op (see ``set_fast_ops``)."""
        return set_fast_ops(self, enable)

    def _take_levels(self, indices: Optional[Union[int, Sequence[Level]]]) -> Tuple[List[str], List[int], int]:
        """:func:`check_levels` of ``indices`` and the last stage to run (-1: none)."""
        names, take = check_levels(indices, len(self.mhca_stages), option='indices')
        return names, take, max(take, default=-1)

    def feature_levels(self, indices: Optional[Union[int, Sequence[Level]]] = None) -> List[Dict]:
        """The ``feature_info`` entries (channels, stride, module) of what ``forward_intermediates(x, indices)``
        returns, in its order (the stem maps first, then the stages by depth)."""
        names, take, _ = self._take_levels(indices)
        stems = [dict(info) for info in self.stem_feature_info if info['module'] in names]
        return stems + [dict(self.feature_info[i]) for i in take]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, Sequence[Level]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The stage outputs at ``indices`` (0..3: strides 4, 8, 16, 32), and optionally the final map.

        ``indices`` may also name the stem's maps, ``'stem.0'`` (stride 2, after the first conv) and
        ``'stem.1'`` (stride 4, the stem's output): they come first, e.g. ``['stem.0', 0, 1, 2, 3]``.
        """
        if output_fmt != 'NCHW':
            raise ValueError('MPViT intermediates are NCHW maps')
        names, take_indices, max_index = self._take_levels(indices)
        intermediates = []
        if self.fast_ops:  # as in _stem
            x = x.contiguous(memory_format=torch.channels_last)
        for name, conv in zip(STEM_LEVELS, self.stem):
            x = conv(x)
            if name in names:
                intermediates.append(x)
        last = max_index if (stop_early or intermediates_only) else len(self.mhca_stages) - 1
        for i in range(last + 1):
            x = self.mhca_stages[i](self.patch_embed_stages[i](x))
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, Sequence[Level]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the stage indices."""
        _, take_indices, max_index = self._take_levels(indices)
        self.patch_embed_stages = self.patch_embed_stages[:max_index + 1]
        self.mhca_stages = self.mhca_stages[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from the first conv on: every later conv keeps that layout, so the
        # transformer paths' [B, H, W, C] tokens are views of the maps, never copies.
        if self.fast_ops:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for embed, stage in zip(self.patch_embed_stages, self.mhca_stages):
            x = stage(embed(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.cls_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def find_mpvit(model: nn.Module) -> Tuple[str, 'MPViT']:
    """The first MPViT inside ``model`` (an adapter, a detector, a segmentor) and its key prefix
    (``backbone.bottom_up.backbone.`` in a Detectron2 FPN detector); ``model`` itself gives ``''``."""
    for name, module in model.named_modules():
        if isinstance(module, MPViT):
            return (name + '.' if name else ''), module
    raise CheckpointError(f'{type(model).__name__} has no MPViT inside to load MPViT weights into')
