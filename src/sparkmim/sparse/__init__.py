"""Sparse semantics for unmodified convolutional networks: a reference form (dense then mask)
and a fast form (visible sites only) with the same meaning."""

from .fast import FastSparseMode, SparseMap, supports_fast, to_dense
from .semantics import SparseMode, SparseSemanticsError, batch_norm_rows, like_format, masked_batch_norm

__all__ = ["FastSparseMode", "SparseMap", "SparseMode", "SparseSemanticsError", "batch_norm_rows", "like_format",
           "masked_batch_norm", "supports_fast", "to_dense"]
