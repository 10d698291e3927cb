"""sparkmim: SparK masked image modeling pre-training for any convolutional network."""

from .api import preprocess, pretrain
from .decoder import Densify, LightDecoder
from .encoder import FeatureSpec, SparseEncoder
from .loss import masked_patch_loss, normalize_patches, patchify, unpatchify
from .masking import MaskPyramid, grid_of, grid_size, num_visible, random_visible
from .modality import Modality, modality_for
from .model import Reconstruction, SparK, SparKOutput
from .sparse import SparseMode, SparseSemanticsError

__version__ = "0.1.0"

__all__ = [
    "pretrain",
    "preprocess",
    "SparK",
    "SparKOutput",
    "Reconstruction",
    "SparseEncoder",
    "FeatureSpec",
    "LightDecoder",
    "Densify",
    "MaskPyramid",
    "SparseMode",
    "SparseSemanticsError",
    "grid_of",
    "grid_size",
    "Modality",
    "modality_for",
    "num_visible",
    "random_visible",
    "patchify",
    "unpatchify",
    "normalize_patches",
    "masked_patch_loss",
]
