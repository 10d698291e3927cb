"""Hierarchical densify (section 3.2) and the light UNet decoder (appendix A)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .masking import MaskPyramid
from .norms import MaskedBatchNorm2d, MaskedLayerNorm2d, SyncableBatchNorm2d

__all__ = ["LightDecoder", "DecoderBlock", "Densify", "SyncableBatchNorm2d", "MaskedBatchNorm2d",
           "MaskedLayerNorm2d", "sincos_2d"]


def sincos_2d(channels: int, height: int, width: int, *, device=None, dtype=None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``(1, channels, height, width)``; half the
    channels encode the row, half the column (channels must be a multiple of 4)."""
    if channels % 4:
        raise ValueError(f"positional embeddings need a channel count divisible by 4, got {channels}")
    quarter = channels // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float64)[:, None] * omega  # (H, q)
    xs = torch.arange(width, device=device, dtype=torch.float64)[:, None] * omega  # (W, q)
    row = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    emb = torch.cat([row, col], dim=2).permute(2, 0, 1).unsqueeze(0)
    return emb.to(dtype or torch.get_default_dtype())


class Densify(nn.Module):
    """Per-scale densify: sparse norm, fill masked sites with a learnable mask token, project.

    ``D = proj(where(visible, norm(S), mask_token))``; the projection is 1x1 at the coarsest
    scale (identity when the widths already match) and 3x3 elsewhere.
    """

    def __init__(self, in_channels: int, out_channels: int, *, coarsest: bool, norm: str = "bn",
                 token_std: float = 0.02, pos_embed: bool = False):
        super().__init__()
        if norm == "bn":
            self.norm: nn.Module = MaskedBatchNorm2d(in_channels)
        elif norm == "ln":
            self.norm = MaskedLayerNorm2d(in_channels, eps=1e-6)
        elif norm == "none":
            self.norm = nn.Identity()
        else:
            raise ValueError(f"densify norm must be 'bn', 'ln' or 'none', got {norm!r}")
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, 1, 1))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=token_std, a=-token_std, b=token_std)
        if coarsest and in_channels == out_channels:
            self.proj: nn.Module = nn.Identity()
        else:
            # PyTorch's default initialisation (uniform, bound 1 / sqrt(fan_in), bias included), as
            # in the reference recipe, where the projections sit outside the decoder's own init
            k = 1 if coarsest else 3
            self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=k, padding=k // 2, bias=True)
        self.pos_embed = pos_embed

    def forward(self, feature: Tensor, masks: MaskPyramid, factor: int) -> Tensor:
        x = feature if isinstance(self.norm, nn.Identity) else self.norm(feature, masks, factor)
        x = torch.where(masks.at(factor), x, self.mask_token.to(x.dtype))
        x = self.proj(x)
        if self.pos_embed:
            x = x + sincos_2d(x.shape[1], x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        return x


class DecoderBlock(nn.Module):
    """2x transposed-conv upsampling followed by two 3x3 conv-BN layers (ReLU6 between)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, padding=1, bias=False),
            SyncableBatchNorm2d(cin),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            SyncableBatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """UNet-style decoder of appendix A: ``depth`` blocks, width halving each time, then a 1x1 head.

    ``forward(inputs)`` takes one tensor (or None) per block, coarsest first; input ``i`` is
    added before block ``i``.
    """

    def __init__(self, width: int = 768, depth: int = 5, out_channels: int = 3):
        super().__init__()
        if width % (2 ** depth):
            raise ValueError(f"decoder width {width} must be divisible by 2**{depth} (it halves per block)")
        self.widths = [width // 2**i for i in range(depth + 1)]
        self.blocks = nn.ModuleList(DecoderBlock(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))
        self.head = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference recipe's initialisation (what produced the paper's results):
        convolutions truncated-normal (std 0.02) with zero bias; the up-sampling transposed
        convolutions kaiming-normal (fan-out, ReLU gain: std ``sqrt(2 / (16 * width))``) with
        zero bias; norms weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
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

    @staticmethod
    def depth_for(patch_size: int) -> int:
        depth = round(math.log2(patch_size))
        if 2**depth != patch_size:
            raise ValueError(f"patch size {patch_size} must be a power of 2")
        return depth
