"""SparK: sparse encoder + hierarchical densify + light decoder + masked loss."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbones import norm_kind
from .config import LossOn
from .decoder import Densify, LightDecoder, deepest_width
from .encoder import SparseEncoder
from .loss import masked_patch_loss, normalize_patches, patchify, unpatchify
from .masking import MaskPyramid, check_mask_ratio, grid_of, num_visible, random_visible
from .weights import ENCODER_PREFIX

__all__ = ["SparK", "SparKOutput", "Reconstruction", "default_densify_norm"]


@dataclass
class SparKOutput:
    """Result of one SparK forward pass.

    Attributes:
        loss: scalar reconstruction loss.
        visible: ``(B, 1, *grid)`` bool mask, True = visible patch.
        prediction: ``(B, C, *spatial)`` decoder output, in per-patch normalised pixel space.
    """

    loss: Tensor
    visible: Tensor
    prediction: Tensor


@dataclass
class Reconstruction:
    """Images (or volumes) for visualisation, all ``(B, C, *spatial)`` in the input's (normalised)
    pixel space."""

    input: Tensor
    masked: Tensor
    reconstruction: Tensor  # prediction de-normalised per patch, pasted over the visible patches
    prediction: Tensor  # prediction de-normalised per patch everywhere
    visible: Tensor


def default_densify_norm(encoder: SparseEncoder) -> str:
    """'bn' for BatchNorm backbones, 'ln' for LayerNorm backbones (BatchNorm wins if both)."""
    return norm_kind(encoder.model)


class SparK(nn.Module):
    """Sparse masked modeling with hierarchy around a :class:`SparseEncoder`.

    Args:
        encoder: the sparse encoder (any convnet).
        mask_ratio: fraction of patches masked per image (exact count per sample).
        decoder_width: width of the decoder's first block, halved per block; None: the encoder's
            deepest width, rounded up to a multiple of 2**blocks (sparkmim's default for volumes).
        densify_norm: 'bn', 'ln', 'none' or 'auto' (by the encoder's norm layers).
        hierarchical: False decodes from the coarsest feature map only (ablation).
        sparse: False runs the encoder's convnet densely on the zeroed image (the "zero-out"
            ablation); the encoder itself is left as it was built.
        pos_embed: add fixed sine-cosine position embeddings to densified maps (ablation).
        loss_on: 'masked' (paper) or 'all' patches (ablation).
        norm_pix: True (paper): the target is each patch's pixels normalised by the patch's mean
            and std; False: the (normalised) image's pixels (ablation).
        norm_pix_eps: epsilon in the per-patch target normalisation.
        mask_token_std: std of the truncated-normal mask token initialisation.

    ``out = model(images)`` draws masks, encodes, decodes and returns :class:`SparKOutput`;
    ``model(images, visible=mask)`` uses the given mask.
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        *,
        mask_ratio: float = 0.6,
        decoder_width: int | None = 768,
        densify_norm: str = "auto",
        hierarchical: bool = True,
        sparse: bool = True,
        pos_embed: bool = False,
        loss_on: str = "masked",
        norm_pix: bool = True,
        norm_pix_eps: float = 1e-6,
        mask_token_std: float = 0.02,
    ):
        super().__init__()
        if loss_on not in typing.get_args(LossOn):
            raise ValueError(f"loss_on must be one of {', '.join(typing.get_args(LossOn))}, got {loss_on!r}")
        check_mask_ratio(mask_ratio)
        self.encoder = encoder
        self.sparse = sparse
        self.mask_ratio = mask_ratio
        self.patch_size = encoder.patch_size
        self.in_chans = encoder.in_chans
        self.hierarchical = hierarchical
        self.loss_on = loss_on
        self.norm_pix, self.norm_pix_eps = norm_pix, norm_pix_eps
        self.densify_norm = default_densify_norm(encoder) if densify_norm == "auto" else densify_norm
        self.spatial_dims = encoder.spatial_dims
        if decoder_width is None:  # the deepest map's width, rounded up so that it halves evenly per block
            decoder_width = deepest_width(encoder.channels[-1], self.patch_size, encoder.factors)
        self.decoder_width = decoder_width
        # the decoder's ladder passes through every feature map's sites per patch; one densify per
        # used scale, coarsest first, feeds the block whose input sits at its map's sites per patch
        self.decoder = LightDecoder(decoder_width, out_channels=self.in_chans, patch_size=self.patch_size,
                                    factors=encoder.factors)
        scales = list(zip(encoder.strides, encoder.factors, encoder.channels))[::-1]
        if not hierarchical:
            scales = scales[:1]
        self.factors: list[tuple[int, ...]] = [factor for _, factor, _ in scales]
        self.levels: list[int] = [self.decoder.factors.index(factor) for factor in self.factors]
        self.densify = nn.ModuleList(
            Densify(c, self.decoder.widths[lvl], coarsest=(lvl == 0), norm=self.densify_norm,
                    token_std=mask_token_std, pos_embed=pos_embed, spatial_dims=self.spatial_dims)
            for (_, _, c), lvl in zip(scales, self.levels)
        )

    # -- stages ------------------------------------------------------------------------------
    def grid(self, images: Tensor) -> tuple[int, ...]:
        """The patch grid of ``images`` (``(h, w)``, or ``(d, h, w)`` for volumes and clips)."""
        return grid_of(tuple(images.shape[-self.spatial_dims:]), self.patch_size)

    def draw_masks(self, images: Tensor, generator: torch.Generator | None = None, rank: int = 0, world: int = 1,
                   ratio: float | None = None) -> MaskPyramid:
        """Random masks for ``images`` (``ratio`` or the model's mask ratio, exactly the same number
        of visible patches per sample), on the images' device. With several ranks, the masks are
        drawn for the global batch of ``world`` x ``len(images)`` and this rank takes rows ``rank,
        rank + world, ...`` (the positions its samples hold in the global batch), so a seeded
        generator gives every world size the same masks."""
        grid = self.grid(images)
        ratio = self.mask_ratio if ratio is None else ratio
        visible = random_visible(images.shape[0] * world, grid, ratio, generator=generator,
                                 device=images.device if generator is None else None)
        if world > 1:
            visible = visible[rank::world]
        if visible.device != images.device:
            visible = visible.to(images.device, non_blocking=True)
        return MaskPyramid(visible, keep=num_visible(math.prod(grid), ratio))

    def load_reference(self, path_or_state, input_size: int | None = None) -> dict[str, list[str]]:
        """Load one of the paper's released ``_withdecoder_..._spark_style.pth`` checkpoints (read
        as plain data) into this model, built for the same backbone: encoder, densify norms and
        projections, mask tokens and decoder (:func:`sparkmim.released.load_reference`)."""
        from .released import load_reference

        return load_reference(self, path_or_state, input_size=input_size)

    def forward_encoder(self, images: Tensor, masks: MaskPyramid) -> list[Tensor]:
        """Sparse features, coarsest first: ``[(B, C_i, *(size / s_i))]`` (with ``sparse=False``,
        the dense convnet's features of the masked images, zero at masked pixels)."""
        if not self.sparse:
            return self.encoder(torch.where(masks.at(self.patch_size), images, 0.0))[::-1]
        return self.encoder(images, masks)[::-1]

    def forward_densify(self, features: list[Tensor], masks: MaskPyramid) -> list[Tensor | None]:
        """Decoder inputs per level (None where no feature map feeds that level)."""
        inputs: list[Tensor | None] = [None] * len(self.decoder.blocks)
        for feature, densify, level, factor in zip(features, self.densify, self.levels, self.factors):
            inputs[level] = densify(feature, masks, factor)
        return inputs

    def forward_decoder(self, inputs: list[Tensor | None]) -> Tensor:
        """``(B, C, *spatial)`` prediction in per-patch normalised pixel space."""
        return self.decoder(inputs)

    def forward_loss(self, images: Tensor, prediction: Tensor, visible: Tensor) -> Tensor:
        return masked_patch_loss(prediction, images, visible, self.patch_size, eps=self.norm_pix_eps,
                                 masked_only=self.loss_on == "masked", norm_pix=self.norm_pix)

    def _masks(self, images: Tensor, visible, generator) -> MaskPyramid:
        if visible is None:
            return self.draw_masks(images, generator)
        masks = visible if isinstance(visible, MaskPyramid) else MaskPyramid.from_visible(visible)
        if masks.grid != self.grid(images):
            raise ValueError(f"mask grid {'x'.join(map(str, masks.grid))} does not match the input grid "
                             f"{self.grid(images)}")
        return masks

    def forward(self, images: Tensor, visible: Tensor | MaskPyramid | None = None,
                generator: torch.Generator | None = None) -> SparKOutput:
        masks = self._masks(images, visible, generator)
        features = self.forward_encoder(images, masks)
        prediction = self.forward_decoder(self.forward_densify(features, masks))
        loss = self.forward_loss(images, prediction, masks.visible)
        return SparKOutput(loss=loss, visible=masks.visible, prediction=prediction)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, visible: Tensor | MaskPyramid | None = None,
                    generator: torch.Generator | None = None) -> Reconstruction:
        """Input, masked input and reconstruction for visualisation (the model's mode is kept)."""
        out = self(images, visible, generator)
        p, grid, c = self.patch_size, self.grid(images), images.shape[1]
        pred = out.prediction
        if self.norm_pix:  # the prediction of each patch in the true patch's mean and std
            _, mean, std = normalize_patches(patchify(images, p), self.norm_pix_eps)
            pred = unpatchify(patchify(pred, p) * std + mean, p, grid, c)
        full = MaskPyramid.from_visible(out.visible).at(p)
        return Reconstruction(
            input=images,
            masked=torch.where(full, images, 0.0),
            reconstruction=torch.where(full, images, pred),
            prediction=pred,
            visible=out.visible,
        )

    def set_sync_group(self, group) -> None:
        """Batch statistics over all ranks of ``group`` (None: per process) for the encoder's batch
        norms (visible sites of every rank), the densify norms and the decoder's batch norms."""
        from .norms import SyncableBatchNorm

        self.encoder.sync_group = group
        for m in self.modules():
            if isinstance(m, SyncableBatchNorm):
                m.sync_group = group

    def unused_parameters(self) -> list[str] | None:
        """Names of parameters that never receive a gradient (backbone parts after the last
        feature map, e.g. a classifier head); None when the encoder was built without its check."""
        if self.encoder.unused_parameters is None:
            return None
        return [ENCODER_PREFIX + n for n in self.encoder.unused_parameters]

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights with the original model's keys (what export writes)."""
        return self.encoder.model.state_dict()
