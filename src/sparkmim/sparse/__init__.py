"""Sparse semantics for unmodified convolutional networks."""

from .semantics import SparseMode, SparseSemanticsError, masked_batch_norm

__all__ = ["SparseMode", "SparseSemanticsError", "masked_batch_norm"]
