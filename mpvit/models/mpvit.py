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

Paper: https://arxiv.org/abs/2112.11010
"""

import os
import weakref
from contextlib import nullcontext
from typing import Callable, Dict, Final, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, SelectAdaptivePool2d, fast_layer_norm, register_notrace_module, trunc_normal_
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models import (
    FeatureInfo,
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices  # private (no public export): tests/test_dependencies.py
from torch.nn.utils.fusion import fuse_conv_bn_weights

from mpvit import model_zoo
from mpvit.checkpoint import CheckpointError, checkpoint_filter_fn, load_backbone_weights, local_checkpoint
from mpvit.errors import InvalidInputError
from mpvit.weights import HUB_PREFIX

__all__ = ['MPViT', 'MPVIT_ARCHS', 'MPViTFeatures', 'STEM_LEVELS', 'checkpoint_filter_fn', 'find_mpvit',
           'fold_batchnorm', 'mpvit_arch', 'set_batch_paths', 'set_fast_ops']

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
    """Conv (no bias) -> norm -> optional activation (``conv``, ``bn`` in checkpoints)."""

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
    """Depthwise kxk -> pointwise 1x1 -> norm -> Hardswish: one step of a patch-embedding chain."""

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
    def __init__(self, dim: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.patch_conv = DWConv2dBN(dim, dim, 3, stride, norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_conv(x)


class PatchEmbedStage(nn.Module):
    """Multi-scale patch embedding: a chain of 3x3 convs, one output kept per path.

    Path j sees j + 1 stacked 3x3 convs (receptive field 3, 5, 7, ...), which is
    how the paper gets coarse-to-fine token scales at equal sequence length.
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


BATCH_PATHS = ('auto', 'always', 'never')


def _check_batch_paths(mode: str) -> None:
    if mode not in BATCH_PATHS:
        raise InvalidInputError(f'batch_paths must be one of {BATCH_PATHS} (got {mode!r})')


def set_batch_paths(model: nn.Module, mode: str = 'auto') -> nn.Module:
    """Whether the fast ops run each stage's transformer paths as one batch (see :class:`MHCAStage`) in every
    MPViT inside ``model``; returns ``model``.

    ``'auto'`` (the default) batches them on every device but the CPU. A GPU is bound by the number of ops
    it launches, which batching cuts by the number of paths; a CPU is bound by arithmetic, and its
    per-path products (oneDNN ``linear``) are faster than its batched ones (``baddbmm``). ``'always'`` /
    ``'never'`` force either (``tools/count_ops.py`` counts the batched form on the CPU this way).
    """
    _check_batch_paths(mode)
    for module in model.modules():
        if isinstance(module, MHCAStage):
            module.batch_paths = mode
    return model


@register_notrace_module  # fx leaf: fast_layer_norm asks for the autocast state, which a symbolic trace cannot
class LayerNorm(TimmLayerNorm):
    """timm's LayerNorm with its fast-norm choice made per module (``fast_ops``) instead of by timm's global.

    Fast, it stays in the autocast dtype: native CUDA autocast runs LayerNorm in
    float32, which writes a float32 copy of the tokens only for the next Linear
    to cast it back. The kernel accumulates in float32 either way.
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


def _path_norm(x: torch.Tensor, num_paths: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Each path's LayerNorm on ``[B, H, W, P, C]`` as one group norm with P groups over the ``P * C`` channels
    of a token (per-channel affine ``[P * C]``: each path's own); ``[B * H * W, P * C]`` out. In the autocast
    dtype under autocast, as :class:`LayerNorm`. ``num_paths`` is a Python int, not read off the shape: a
    traced group count is not a constant to ONNX."""
    tokens = x.flatten(0, 2).flatten(1)
    # torch.group_norm: F.group_norm's Python batch-size check turns traced sizes into constants.
    if torch.jit.is_scripting() or dtype is None:
        return torch.group_norm(tokens, num_paths, weight, bias, eps, False)
    with torch.autocast(x.device.type, enabled=False):
        return torch.group_norm(tokens.to(dtype), num_paths, weight, bias, eps, False)


def _qkv_products(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  training: bool = False) -> List[torch.Tensor]:
    """q, k and v of every path, ``[P, M, C]`` each: three batched products of ``y`` ``[P, M, C]`` with the
    paths' stacked ``[P, 3 * C, C]`` qkv weights. Three products rather than one and three strided views:
    q, k and v come out contiguous, which the softmax and the CRPE conv would otherwise copy to get.
    ``training``: by :class:`_QKVProducts`."""
    if training:
        return _qkv_products_accumulating(y, weight, bias)
    weights = weight.chunk(3, dim=1)
    biases = bias.unsqueeze(1).chunk(3, dim=2)
    return [torch.baddbmm(biases[i], y, weights[i].transpose(1, 2)) for i in range(3)]


class _QKVProducts(torch.autograd.Function):
    """:func:`_qkv_products` whose backward accumulates ``y``'s gradient in place (one ``bmm``, two ``baddbmm_``)
    instead of three products and two adds of activation-sized tensors. (Forward and ``setup_context`` apart,
    so that torch.func's transforms accept it.)"""
    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        return tuple(_qkv_products(y, weight, bias))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, weight, _ = inputs
        ctx.save_for_backward(y, weight)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        y, weight = ctx.saved_tensors
        grads, weights = (grad_q, grad_k, grad_v), weight.chunk(3, dim=1)
        grad_y = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.bmm(grad_q, weights[0])
            if torch.is_grad_enabled():  # a backward that builds a graph: out of place (vmap has no in-place rule)
                grad_y = torch.baddbmm(torch.baddbmm(grad_y, grad_k, weights[1]), grad_v, weights[2])
            else:
                grad_y = grad_y.baddbmm_(grad_k, weights[1]).baddbmm_(grad_v, weights[2])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.cat([torch.bmm(g.transpose(1, 2), y) for g in grads], dim=1)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.cat([g.sum(1) for g in grads], dim=1)
        return grad_y, grad_weight, grad_bias


def _path_linear(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, training: bool = False) -> torch.Tensor:
    """Each path's Linear on ``y`` ``[P, M, in]``: one batched product with the stacked ``[P, out, in]`` weights.
    ``training``: by :class:`_PathLinear`."""
    if training:
        return _path_linear_own_layout(y, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), y, weight.transpose(1, 2))


class _PathLinear(torch.autograd.Function):
    """:func:`_path_linear` whose weight gradient is written ``[P, out, in]``, the weight's own layout (autograd's
    ``baddbmm`` backward writes the transposed operand's ``[P, in, out]``, which then takes a copy to get back)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _path_linear(y, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, weight, _ = inputs
        ctx.save_for_backward(y, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weight = ctx.saved_tensors
        grad_y = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), y) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_y, grad_weight, grad_bias


@torch.jit.unused
def _path_linear_own_layout(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`_path_linear` for training (an autograd function: not for TorchScript or tracing)."""
    return _PathLinear.apply(y, weight, bias)


class _MulInOwnLayouts(torch.autograd.Function):
    """``a * b`` (same shape) whose backward writes each operand's gradient in that operand's own memory layout.
    Autograd's ``mul`` backward writes both in the output's, and a permuted view's gradient then takes a copy
    back (the CRPE conv's output, read path-major, is one)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = _mul_into_layout(grad, b, a) if ctx.needs_input_grad[0] else None
        grad_b = _mul_into_layout(grad, a, b) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _mul_into_layout(x: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x * y`` written in ``like``'s memory layout. A backward that builds a graph (double backward, torch.func)
    gets the plain product (``out=`` is not differentiable), and so does torch.compile (which chooses layouts
    itself, and whose Dynamo refuses a strided ``out=``)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return x * y
    return torch.mul(x, y, out=torch.empty_like(like))


@torch.jit.unused
def _mul_in_own_layouts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:class:`_MulInOwnLayouts` (an autograd function: not for TorchScript or tracing)."""
    return _MulInOwnLayouts.apply(a, b)


class _StackParams(torch.autograd.Function):
    """``torch.cat(pieces).to(dtype).split(sizes)`` writing each element once each way: one fused copy-and-cast
    over all the pieces (``torch._foreach_copy_``, a few kernels on CUDA) into one buffer, and in the backward
    the gradients likewise into one buffer of the pieces' dtype, handed back as views of it. (The composite
    writes the float32 concatenation, then its cast; the backward concatenates, then casts.)"""

    @staticmethod
    def forward(dtype: torch.dtype, sizes: List[int], *pieces: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        numels = [piece.numel() for piece in pieces]
        flat = pieces[0].new_empty(sum(numels), dtype=dtype)
        torch._foreach_copy_(flat.split(numels), pieces)
        return flat.split(sizes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, sizes, *pieces = inputs
        ctx.sizes, ctx.numels, ctx.dtype = sizes, [piece.numel() for piece in pieces], pieces[0].dtype

    @staticmethod
    def vmap(info, in_dims, dtype: torch.dtype, sizes: List[int], *pieces: torch.Tensor):
        """Under ``torch.func.vmap`` (per-sample gradients, say): the composite, per sample."""
        pieces = tuple(piece.movedim(dim, 0) if dim is not None else piece.expand(info.batch_size, -1)
                       for piece, dim in zip(pieces, in_dims[2:]))
        outputs = torch.cat(pieces, dim=1).to(dtype).split(sizes, dim=1)
        return outputs, (0,) * len(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if torch.is_grad_enabled():  # a backward that builds a graph (double backward, torch.func): plain ops
            flat = torch.cat(grads).to(ctx.dtype)
        else:
            flat = grads[0].new_empty(sum(ctx.numels), dtype=ctx.dtype)
            torch._foreach_copy_(flat.split(ctx.sizes), grads)
        return (None, None) + flat.split(ctx.numels)


def _stack_params(pieces: List[torch.Tensor], sizes: List[int], dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    """The 1-D ``pieces`` concatenated, cast to ``dtype`` (if given) and split into ``sizes``."""
    flat = torch.cat(pieces)
    return list((flat if dtype is None else flat.to(dtype)).split(sizes))


@torch.jit.unused
def _stack_params_once(pieces: List[torch.Tensor], sizes: List[int],
                       dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    """:func:`_stack_params` by :class:`_StackParams` (an autograd function: not for TorchScript or tracing).
    Pieces of mixed dtypes take the composite, which promotes them as ``torch.cat`` does."""
    if any(piece.dtype != pieces[0].dtype for piece in pieces):
        return _stack_params(pieces, sizes, dtype)
    return list(_StackParams.apply(pieces[0].dtype if dtype is None else dtype, sizes, *pieces))


@torch.jit.unused
def _qkv_products_accumulating(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """:func:`_qkv_products` for training (an autograd function: not for TorchScript or tracing)."""
    return list(_QKVProducts.apply(y, weight, bias))


def _paths_to_channels(x: torch.Tensor) -> torch.Tensor:
    """``[P, B, H, W, C]`` -> ``[B, P * C, H, W]`` channels-last (one copy)."""
    p, b, height, width, c = x.shape
    return x.permute(1, 2, 3, 0, 4).reshape(b, height, width, p * c).permute(0, 3, 1, 2)


NUM_NORM_PARAMS = 4  # MHCALayer.path_params lists the norms' weights and biases first


class MHCALayer(nn.Module):
    """One transformer layer of a path: CPE, factorized attention, MLP (pre-norm)."""
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

    def path_params(self) -> List[torch.Tensor]:
        """The parameters :meth:`forward_paths` takes stacked over the paths, in its order: the norms'
        (``NUM_NORM_PARAMS``, stacked flat, ``[P * C]``), then the products'."""
        attn = self.factoratt_crpe
        return [self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias, attn.qkv.weight,
                attn.qkv.bias, attn.proj.weight, attn.proj.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                self.mlp.fc2.weight, self.mlp.fc2.bias]

    def forward_paths(self, x: torch.Tensor, num_paths: int, params: List[torch.Tensor], cpe_w: torch.Tensor,
                      cpe_b: torch.Tensor, crpe_w: torch.Tensor, crpe_b: torch.Tensor, head_mask: torch.Tensor,
                      dtype: Optional[torch.dtype]) -> torch.Tensor:
        """This layer of every path of the stage at once (:meth:`MHCAStage.forward_paths`), on ``[B, H, W, P, C]``:
        ``params`` are the paths' :meth:`path_params` stacked. This module (the first path's layer) gives what
        all paths share: the heads, the norms' epsilon, the drop-path rate."""
        norm1_w, norm1_b, norm2_w, norm2_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b = params
        b, height, width, p, c = x.shape
        n, h = height * width, self.factoratt_crpe.num_heads
        # CPE: x + depthwise conv(x), residual in the kernel, every path's channels in one conv. The conv
        # returns channels-last here (then .contiguous() is free), but not on every backend ('meta', say).
        x = F.conv2d(x.view(b, height, width, p * c).permute(0, 3, 1, 2), cpe_w, cpe_b,
                     padding=cpe_w.shape[-1] // 2, groups=p * c)
        x = x.permute(0, 2, 3, 1).contiguous().view(b, height, width, p, c)

        # Factorized attention, path-major: q, k, v [P, B * N, C] from three batched products.
        y = _path_norm(x, num_paths, norm1_w, norm1_b, self.norm1.eps, dtype).view(b * n, p, c).transpose(0, 1)
        # Training uses autograd functions whose backwards write less (TorchScript and tracing: plain ops).
        training = torch.is_grad_enabled() and not (torch.jit.is_scripting() or torch.jit.is_tracing())
        q, k, v = _qkv_products(y, qkv_w, qkv_b, training)
        context = torch.bmm(_softmax(k.view(p * b, n, c), dim=1).transpose(1, 2), v.view(p * b, n, c))
        context = (context.view(p * b, h, c // h, h, c // h) * head_mask).view(p * b, c, c)  # each head's block
        # CRPE: q * depthwise conv(v), every path's channels in one conv.
        conv_v = F.conv2d(_paths_to_channels(v.view(p, b, height, width, c)), crpe_w, crpe_b,
                          padding=crpe_w.shape[-1] // 2, groups=p * c)
        conv_v = conv_v.permute(0, 2, 3, 1).reshape(b, height, width, p, c).permute(3, 0, 1, 2, 4)
        q5 = q.view(p, b, height, width, c)
        crpe = (_mul_in_own_layouts(q5, conv_v) if training else q5 * conv_v).reshape(p * b, n, c)
        out = torch.baddbmm(crpe, q.view(p * b, n, c), context, alpha=self.factoratt_crpe.scale)
        out = _path_linear(out.view(p, b * n, c), proj_w, proj_b, training)
        x = x + self._drop_paths(out.view(p, b, height, width, c)).permute(1, 2, 3, 0, 4)

        # MLP.
        y = _path_norm(x, num_paths, norm2_w, norm2_b, self.norm2.eps, dtype).view(b * n, p, c).transpose(0, 1)
        hidden = F.gelu(_path_linear(y, fc1_w, fc1_b, training))
        out = _path_linear(hidden, fc2_w, fc2_b, training)
        return x + self._drop_paths(out.view(p, b, height, width, c)).permute(1, 2, 3, 0, 4)

    def _drop_paths(self, x: torch.Tensor) -> torch.Tensor:
        """Stochastic depth on ``[P, B, ...]``, per path and sample: this layer's ``drop_path`` draws a ``[P * B]``
        mask (as it would on the merged batch: the same draws). Applied to ``x`` as is: merging P and B into the
        module's batch would make the backward copy the residual's gradient into that layout."""
        if not (self.has_drop_path and self.drop_path.training):  # the module's own mode, as its forward reads
            return x
        p, b = x.shape[0], x.shape[1]
        mask = self.drop_path(x.new_ones(p * b, 1, 1, 1))
        return x * mask.view(p, b, 1, 1, 1)


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


def _copy_shared_aliases(module: nn.Module, state_dict: Dict, prefix: str, local_metadata: Dict) -> None:
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


def _resolve_alias_copies(module: nn.Module, state_dict: Dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: loading writes every key of the shared modules in module order (encoder
    key, then each layer's alias), the last one winning, as in the reference. An alias that is an unchanged
    copy from :func:`_copy_shared_aliases` is replaced by the value written before it, as the shared tensor
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


class MHCAEncoder(nn.Module):
    """The transformer encoder of one path; its CPE and CRPE are shared by all its layers."""

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
        self.register_state_dict_post_hook(_copy_shared_aliases)
        self.register_load_state_dict_pre_hook(_resolve_alias_copies)

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
    """The local (convolutional) path: inverted residual with a depthwise 3x3."""

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

    The transformer paths of a stage have the same width, depth and heads; only
    their weights and inputs differ. With ``fast_ops`` they run as one batch (on the
    CPU only if asked for: :func:`set_batch_paths`): per
    layer one depthwise conv over the paths' concatenated channels for each
    position encoding, one group norm (each path's LayerNorm), and batched
    products (``baddbmm`` over the paths' stacked weights) for q, k, v, the output
    projection and the MLP.
    The residual stream is ``[B, H, W, P, C]`` (the paths' channels side by side,
    what the convs and the aggregation want); the products read it as a strided
    ``[P, B * H * W, C]`` batch and write path-major results. The parameters stay
    per path (checkpoint keys unchanged) and are stacked once per stage forward.
    Paths whose modules are wrapped, replaced or hooked run one by one
    (:meth:`paths_batchable`).
    """
    fast_ops: Final[bool]
    batch_paths: Final[str]

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
            batch_paths: str = 'auto',
    ):
        super().__init__()
        self.mhca_blks = nn.ModuleList([
            MHCAEncoder(dim, num_layers, num_heads, mlp_ratio, drop_path_list, fast_ops=fast_ops)
            for _ in range(num_path)
        ])
        self.InvRes = InvResBlock(dim, norm_layer=norm_layer)
        self.aggregate = Conv2dBN(dim * (num_path + 1), out_dim, norm_layer=norm_layer, act_layer=nn.Hardswish)
        self.fast_ops = fast_ops
        _check_batch_paths(batch_paths)
        self.batch_paths = batch_paths  # see set_batch_paths
        self.num_norm_params = NUM_NORM_PARAMS  # (TorchScript reads no global constants)
        self.num_heads = num_heads

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        outputs = [self.InvRes(inputs[0])]
        if self.fast_ops and self._batches(inputs[0]) and (torch.jit.is_scripting() or self.paths_batchable()):
            outputs.append(self.forward_paths(inputs))
        else:
            for i, encoder in enumerate(self.mhca_blks):
                outputs.append(encoder(inputs[i]))
        return self.aggregate(torch.cat(outputs, dim=1))

    def _batches(self, x: torch.Tensor) -> bool:
        if self.batch_paths == 'auto':
            return x.device.type != 'cpu'
        return self.batch_paths == 'always'

    @torch.jit.unused
    def paths_batchable(self) -> bool:
        """Whether the batched form stands for the paths' modules: it reads their parameters and runs its own
        ops, so it does only when they are the plain modules, without hooks. A wrapped or replaced submodule
        (a LoRA adapter, say) or a forward hook (old-style weight norm, offloading, feature taps) makes the
        paths run one by one, through their modules' forwards."""
        for module in self.mhca_blks.modules():
            if module._forward_hooks or module._forward_pre_hooks:
                return False
        for encoder in self.mhca_blks:
            if not (type(encoder.cpe) is ConvPosEnc and type(encoder.cpe.proj) is nn.Conv2d
                    and type(encoder.crpe) is ConvRelPosEnc
                    and all(type(conv) is nn.Conv2d for conv in encoder.crpe.conv_list)):
                return False
            for layer in encoder.MHCA_layers:
                mlp, attn = layer.mlp, layer.factoratt_crpe
                if not (type(layer) is MHCALayer and type(layer.norm1) is LayerNorm and type(layer.norm2) is LayerNorm
                        and type(attn) is FactorAttnConvRelPosEnc and type(attn.qkv) is nn.Linear
                        and type(attn.proj) is nn.Linear and type(mlp) is Mlp and type(mlp.fc1) is nn.Linear
                        and type(mlp.fc2) is nn.Linear and type(mlp.act) is nn.GELU and mlp.act.approximate == 'none'
                        and type(mlp.norm) is nn.Identity
                        and all(type(d) is nn.Identity or (type(d) is nn.Dropout and d.p == 0)
                                for d in (mlp.drop1, mlp.drop2))
                        and (type(layer.drop_path) is nn.Identity
                             or (type(layer.drop_path) is DropPath and layer.has_drop_path))):
                    return False
        return True

    def forward_paths(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """All transformer paths as one batch: ``inputs[p]`` ``[B, C, H, W]`` in, ``[B, P * C, H, W]`` out (the
        paths' outputs side by side, channels-last)."""
        num_paths = len(self.mhca_blks)
        x = torch.stack([inputs[i].permute(0, 2, 3, 1) for i in range(num_paths)], dim=3)  # [B, H, W, P, C]
        dtype = _autocast_dtype(x)
        layer_params, cpe_w, cpe_b, crpe_w, crpe_b = self._stage_weights(dtype)
        head_mask = _head_mask(self.num_heads, x.dtype if dtype is None else dtype, x.device)
        checkpointing = self.mhca_blks[0].grad_checkpointing  # set_grad_checkpointing sets every encoder's
        for i, layer in enumerate(self.mhca_blks[0].MHCA_layers):
            if checkpointing and not torch.jit.is_scripting():
                x = checkpoint(layer.forward_paths, x, num_paths, layer_params[i], cpe_w, cpe_b, crpe_w, crpe_b,
                               head_mask, dtype)
            else:
                x = layer.forward_paths(x, num_paths, layer_params[i], cpe_w, cpe_b, crpe_w, crpe_b, head_mask, dtype)
        return x.flatten(3).permute(0, 3, 1, 2)

    def _stage_weights(self, dtype: Optional[torch.dtype]) -> Tuple[
            List[List[torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every path's parameters, stacked per layer: ``[P, ...]`` per tensor of :meth:`MHCALayer.path_params`
        (``[P * C]`` for the norms), and the CPE / CRPE kernels of all paths as single depthwise convs.

        One fused copy (and cast) for the whole stage into one buffer, split into views; its backward writes
        the gradients into one buffer in the parameters' dtype, whatever the number of layers and paths
        (:class:`_StackParams`)."""
        num_paths = len(self.mhca_blks)
        per_path: List[List[List[torch.Tensor]]] = []  # [path][layer][tensor]
        k_max = 0
        for encoder in self.mhca_blks:
            per_path.append([layer.path_params() for layer in encoder.MHCA_layers])
            k_max = max(k_max, encoder.crpe.max_kernel_size())
        num_layers, num_tensors = len(per_path[0]), len(per_path[0][0])
        pieces: List[torch.Tensor] = []
        shapes: List[List[int]] = []  # of each layer's tensors, stacked over the paths
        for j, tensor in enumerate(per_path[0][0]):
            shape = list(tensor.shape)
            shapes.append([num_paths * shape[0]] if j < self.num_norm_params else [num_paths] + shape)
        for i in range(num_layers):
            for j in range(num_tensors):
                for path in per_path:
                    tensor = path[i][j]
                    pieces.append(tensor if tensor.dim() == 1 else tensor.reshape(-1))  # (views cost dispatches)
        cpe = self.mhca_blks[0].cpe.proj
        k = cpe.kernel_size[0]
        identity = F.pad(cpe.weight.new_ones(cpe.out_channels, 1, 1, 1), [k // 2] * 4)  # +1 at the centre tap
        for encoder in self.mhca_blks:  # x + conv(x) as one conv, in float32 (before any cast)
            weight = encoder.cpe.proj.weight
            pieces.append((weight if encoder.cpe.residual_in_kernel else weight + identity).reshape(-1))
        for encoder in self.mhca_blks:
            bias = encoder.cpe.proj.bias
            assert bias is not None  # always (the conv has a bias); says so to TorchScript
            pieces.append(bias)
        crpe_biases: List[torch.Tensor] = []
        for encoder in self.mhca_blks:
            weights, biases = encoder.crpe.padded_kernels(k_max)
            pieces += [w.reshape(-1) for w in weights]
            crpe_biases += biases
        pieces += crpe_biases
        channels = num_paths * cpe.out_channels
        sizes = [num_paths * t.numel() for t in per_path[0][0]] * num_layers + [
            channels * k * k, channels, channels * k_max * k_max, channels]
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            split = _stack_params(pieces, sizes, dtype)
        else:
            split = _stack_params_once(pieces, sizes, dtype)
        layer_params: List[List[torch.Tensor]] = []
        for i in range(num_layers):
            piece = split[i * num_tensors:(i + 1) * num_tensors]
            layer_params.append([piece[j] if len(shapes[j]) == 1 else piece[j].view(shapes[j])
                                 for j in range(num_tensors)])
        return (layer_params, split[-4].view(channels, 1, k, k), split[-3],
                split[-2].view(channels, 1, k_max, k_max), split[-1])

GLOBAL_POOLS = ('avg', 'max', 'avgmax', '')  # each keeps the width: pre-logits are num_features wide


class ClsHead(nn.Module):
    """timm's selectable global pool -> dropout -> Linear (``cls`` in checkpoints).

    With ``global_pool=''`` the map is not pooled and the classifier, if any, is
    applied at every position (``[B, num_classes, H, W]``), as timm's conv heads do,
    with the same ``cls.weight`` / ``cls.bias`` keys.
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
        drop_path_rate: stochastic depth, linear over all layers of all stages.
        global_pool: timm's pool types ``'avg'``, ``'max'``, ``'avgmax'``, or ``''`` (no pooling;
            a classifier is then applied at every position).
        norm_layer: factory ``(num_channels) -> module`` for every conv-path norm
            (BatchNorm2d by default; adapters pass SyncBN / FrozenBN / GroupNorm).
        fast_ops: the faster formulations of the same function (default); ``False`` builds
            the textbook ops, e.g. for FLOP counting. ``set_fast_ops`` switches later.
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
        eager inference builds no kernels (each stage still concatenates its paths'
        parameters once per forward, see :class:`MHCAStage`). Outputs stay the same
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
        ``in_chans``."""
        load_backbone_weights(self, checkpoint_path)

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
        """``indices`` split into the stem levels named (``STEM_LEVELS``, in forward order), the stage indices
        (timm's rules: an int n is the last n stages, negatives count from the end) and the last stage to run
        (-1: none)."""
        if isinstance(indices, (list, tuple)):
            names = [i for i in indices if isinstance(i, str)]
            unknown = [n for n in names if n not in STEM_LEVELS]
            if unknown:
                raise InvalidInputError(f'MPViT feature level {unknown[0]!r}: levels are stage indices 0..'
                                        f'{len(self.mhca_stages) - 1} or the stem maps {", ".join(STEM_LEVELS)}')
            numbers = [i for i in indices if not isinstance(i, str)]
            if names and not numbers:
                return [n for n in STEM_LEVELS if n in names], [], -1
            take, max_index = feature_take_indices(len(self.mhca_stages), numbers)
            return [n for n in STEM_LEVELS if n in names], take, max_index
        take, max_index = feature_take_indices(len(self.mhca_stages), indices)
        return [], take, max_index

    def feature_levels(self, indices: Optional[Union[int, Sequence[Level]]] = None) -> List[Dict]:
        """The ``feature_info`` entries (channels, stride, module) of what ``forward_intermediates(x, indices)``
        returns, in its order (the stem maps first, then the stages by depth)."""
        names, take, _ = self._take_levels(indices)
        stems = [dict(info) for info in self.stem_feature_info if info['module'] in names]
        return stems + [dict(self.feature_info[i]) for i in sorted(set(take))]

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


class MPViTFeatures(nn.Module):
    """The stage maps of a ``features_only`` MPViT (timm's default feature class for it).

    Does what timm's getter wrapper does (the unused stages and the head pruned, the
    maps from ``forward_intermediates``), and keeps the model's own methods that a
    feature extractor needs: ``fuse()`` for inference and ``set_grad_checkpointing``.
    Keys stay ``model.<classification key>``, as with timm's wrappers. ``out_indices`` are
    the stage indices 0..3 (strides 4..32) and may name the stem maps too, ``'stem.0'``
    (stride 2) and ``'stem.1'`` (stride 4), which come first: ``feature_info`` then
    describes the maps in that order.
    """

    def __init__(self, model: 'MPViT', out_indices: Union[int, Sequence[Level]] = (0, 1, 2, 3),
                 out_map: Optional[Sequence] = None, return_dict: bool = False, output_fmt: str = 'NCHW',
                 norm: bool = False, prune: bool = True):
        super().__init__()
        if output_fmt != 'NCHW':
            raise InvalidInputError(f"output_fmt={output_fmt!r}: MPViT's stage maps are NCHW")
        if out_map is not None or return_dict:  # timm's getter wrapper takes them but does not support them either
            raise InvalidInputError('features_only MPViT returns a list of maps: out_map / return_dict are not '
                                    "supported (use feature_cls='hook' for a dict)")
        names, _, _ = model._take_levels(out_indices)
        levels = model.feature_levels(out_indices)
        if prune:
            stage_indices = model.prune_intermediate_layers(out_indices, prune_norm=not norm)
        else:
            _, stage_indices, _ = model._take_levels(out_indices)
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
    def fuse(self) -> 'MPViTFeatures':
        """:meth:`MPViT.fuse` of the wrapped model (in place; returns self)."""
        self.model.fuse()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


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
