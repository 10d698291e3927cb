"""Sparse semantics for unmodified convolutional networks."""

from .semantics import SparseMode, SparseSemanticsError, batch_norm_rows, masked_batch_norm

__all__ = ["SparseMode", "SparseSemanticsError", "batch_norm_rows", "masked_batch_norm"]
