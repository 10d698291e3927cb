"""Hierarchical densify (section 3.2) and the light UNet decoder (appendix A)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .masking import MaskPyramid, shown_size
from .norms import ChannelLayerNorm, MaskedBatchNorm, SyncableBatchNorm

__all__ = ["LightDecoder", "DecoderBlock", "Densify", "sincos", "sincos_2d"]


def sincos(channels: int, sizes: tuple[int, ...], *, device=None, dtype=None) -> Tensor:
    """Fixed sine-cosine position embedding ``(1, channels, *sizes)``: the channels split into one
    equal group per axis (first axis first), each half sines and half cosines of the position
    along that axis (channels must be a multiple of twice the number of axes)."""
    n = len(sizes)
    if channels % (2 * n):
        raise ValueError(f"positional embeddings of {n}-D maps need a channel count divisible by {2 * n}, "
                         f"got {channels}")
    q = channels // (2 * n)
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float64) / q))
    groups = []
    for axis, size in enumerate(sizes):
        pos = torch.arange(size, device=device, dtype=torch.float64)[:, None] * omega  # (size, q)
        wave = torch.cat([pos.sin(), pos.cos()], dim=1)  # (size, 2q)
        shape = [1] * n
        shape[axis] = size
        groups.append(wave.t().reshape(2 * q, *shape).expand(2 * q, *sizes))
    return torch.cat(groups).unsqueeze(0).to(dtype or torch.get_default_dtype())


def sincos_2d(channels: int, height: int, width: int, *, device=None, dtype=None) -> Tensor:
    """:func:`sincos` of a ``height x width`` map: half the channels encode the row, half the
    column (channels must be a multiple of 4)."""
    return sincos(channels, (height, width), device=device, dtype=dtype)


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class Densify(nn.Module):
    """Per-scale densify: sparse norm, fill masked sites with a learnable mask token, project.

    ``D = proj(where(visible, norm(S), mask_token))``; the projection is 1x1 at the coarsest
    scale (identity when the widths already match) and 3x3 elsewhere (1x1x1 and 3x3x3 for 3-D
    maps, ``spatial_dims=3``). ``pos_embed`` adds :func:`sincos` after the projection.
    """

    def __init__(self, in_channels: int, out_channels: int, *, coarsest: bool, norm: str = "bn",
                 token_std: float = 0.02, pos_embed: bool = False, spatial_dims: int = 2):
        super().__init__()
        if norm == "bn":
            self.norm: nn.Module = MaskedBatchNorm(in_channels)
        elif norm == "ln":
            self.norm = ChannelLayerNorm(in_channels, eps=1e-6)
        elif norm == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"densify norm must be 'bn', 'ln' or 'none', got {norm!r}")
        if pos_embed and out_channels % (2 * spatial_dims):
            raise ValueError(f"position embeddings of {spatial_dims}-D maps need decoder widths divisible by "
                             f"{2 * spatial_dims}, got {out_channels} (--decoder-width)")
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, *([1] * spatial_dims)))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=token_std, a=-token_std, b=token_std)
        if coarsest and in_channels == out_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            # PyTorch's default initialisation (uniform, bound 1 / sqrt(fan_in), bias included), as
            # in the reference recipe, where the projections sit outside the decoder's own init
            k = 1 if coarsest else 3
            self.proj = _CONV[spatial_dims](in_channels, out_channels, kernel_size=k, padding=k // 2, bias=True)
        self.pos_embed = pos_embed

    def forward(self, feature: Tensor, masks: MaskPyramid, factor: tuple[int, ...]) -> Tensor:
        x = feature if isinstance(self.norm, nn.Identity) else self.norm(feature, masks, factor)
        x = torch.where(masks.at(factor), x, self.mask_token.to(x.dtype))
        x = self.proj(x)
        if self.pos_embed:
            x = x + sincos(x.shape[1], tuple(x.shape[2:]), device=x.device, dtype=x.dtype)
        return x


class DecoderBlock(nn.Module):
    """2x transposed-conv upsampling followed by two 3x3 conv-BN layers (ReLU6 between).

    ``up`` gives the factor (2 or 1) per axis (its length is the number of spatial dims): an axis
    that is not upsampled gets a stride-1, kernel-3 transposed convolution (the same receptive
    field, the same size)."""

    def __init__(self, cin: int, cout: int, up: tuple[int, ...] = (2, 2)):
        super().__init__()
        n = len(up)
        if any(u not in (1, 2) for u in up):
            raise ValueError(f"decoder up-sampling factors must be 1 or 2 per axis, got {up}")
        self.up = _CONV_T[n](cin, cin, kernel_size=tuple(4 if u == 2 else 3 for u in up), stride=tuple(up),
                             padding=1, bias=True)
        conv = _CONV[n]
        self.conv = nn.Sequential(
            conv(cin, cin, kernel_size=3, padding=1, bias=False),
            SyncableBatchNorm(cin),
            nn.ReLU6(inplace=True),
            conv(cin, cout, kernel_size=3, padding=1, bias=False),
            SyncableBatchNorm(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


def ladder(patch: tuple[int, ...], through: Sequence[tuple[int, ...]] = ()) -> list[tuple[int, ...]]:
    """The sites per patch from one per patch to ``patch`` (one value per axis), passing through
    each of ``through`` (the feature maps' sites per patch), each step doubling every axis that
    is short of the next stop. With no stops (or stops on it) the ladder is ``min(2**i, P)`` per
    axis; an encoder that strides some axes only at a stage (an anisotropic nnU-Net plan, ``(1,
    2, 2)``) adds the steps that double those axes only. ``ValueError`` when a stop does not
    divide the next along every axis."""
    for p in patch:
        if p < 1 or p & (p - 1):
            raise ValueError(f"patch size {patch} must be a power of 2 (along each axis)")
    steps = [(1,) * len(patch)]
    for stop in [*sorted(set(through), key=math.prod), tuple(patch)]:
        here = steps[-1]
        if len(stop) != len(here) or any(s % h for h, s in zip(here, stop)):
            raise ValueError(f"feature maps at {shown_size(here)} and {shown_size(stop)} sites per {shown_size(patch)} patch are no "
                             f"ladder: each map's sites per patch must divide the next finer map's along every axis")
        while here != stop:
            here = tuple(min(2 * h, s) for h, s in zip(here, stop))
            steps.append(here)
    return steps


def deepest_width(channels: int, patch: tuple[int, ...], factors: Sequence[tuple[int, ...]] = ()) -> int:
    """The decoder width of an encoder whose deepest map has ``channels``: that width rounded up
    so that it halves evenly once per block of :func:`ladder`."""
    step = 2 ** (len(ladder(patch, factors)) - 1)
    return -(-channels // step) * step


class LightDecoder(nn.Module):
    """UNet-style decoder of appendix A: blocks that double the resolution, width halving each
    time, then a 1x1 head.

    ``forward(inputs)`` takes one tensor (or None) per block, coarsest first; input ``i`` is
    added before block ``i``. ``patch_size``, one per axis (e.g. ``(32, 32)``, or ``(8, 16, 16)``
    for a clip), and the feature maps' sites per patch ``factors`` set the up-sampling of each
    block (:func:`ladder`): the input of block ``i`` sits at ``self.factors[i]`` sites per patch;
    with maps on the square ladder that is ``min(2**i, P)`` along each axis. ``patch_size`` None
    is the 2-D square patch of ``depth`` blocks (``2**depth`` pixels per side).
    """

    def __init__(self, width: int = 768, depth: int = 5, out_channels: int = 3,
                 patch_size: tuple[int, ...] | None = None, factors: Sequence[tuple[int, ...]] = ()):
        super().__init__()
        self.patch = (2**depth, 2**depth) if patch_size is None else tuple(patch_size)
        steps = ladder(self.patch, factors)
        depth = len(steps) - 1
        if width % (2 ** depth):
            raise ValueError(f"decoder width {width} must be divisible by 2**{depth} (it halves per block)")
        self.widths = [width // 2**i for i in range(depth + 1)]
        self.factors = steps[:-1]
        ups = [tuple(b // a for a, b in zip(lo, hi)) for lo, hi in zip(steps[:-1], steps[1:])]
        self.blocks = nn.ModuleList(DecoderBlock(a, b, up) for a, b, up in zip(self.widths[:-1], self.widths[1:], ups))
        self.head = _CONV[len(self.patch)](self.widths[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference recipe's initialisation (what produced the paper's results):
        convolutions truncated-normal (std 0.02) with zero bias; the up-sampling transposed
        convolutions kaiming-normal (fan-out, ReLU gain: std ``sqrt(2 / (16 * width))``) with
        zero bias; norms weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Conv3d, nn.ConvTranspose3d)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: list[Tensor | None]) -> Tensor:
        x: Tensor | None = None
        for i, block in enumerate(self.blocks):
            if i < len(inputs) and inputs[i] is not None:
                x = inputs[i] if x is None else x + inputs[i]
            if x is None:
                raise ValueError("the decoder's first input must not be None")
            x = block(x)
        return self.head(x)
