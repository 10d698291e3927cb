"""Sparse semantics for unmodified convolutional networks: a reference form (dense then mask)
and a fast form (visible sites only) with the same meaning.

Layout: ``ops`` (the shared vocabulary and error), ``table`` (the one registry of layers, both
forms side by side), ``mode`` (the two torch function modes: dispatch only), ``reference``
(reference handlers), ``tiles`` (``SparseMap``, its geometry and halos), ``algebra`` (shape, index,
split, join and reduction ops on tiles), ``fast`` (fast layer kernels), ``form`` (the choice of
form for one forward pass)."""

from ..norms import batch_norm_rows, like_format, masked_batch_norm
from .form import SPARSE_IMPLS, SparseForm, sparse_form
from .mode import FastSparseMode, SparseMode
from .ops import SparseSemanticsError
from .tiles import SparseMap, supports_fast, to_dense

__all__ = ["FastSparseMode", "SPARSE_IMPLS", "SparseForm", "SparseMap", "SparseMode", "SparseSemanticsError",
           "batch_norm_rows", "like_format", "masked_batch_norm", "sparse_form", "supports_fast", "to_dense"]
