"""Sparse semantics for unmodified convolutional networks: a reference form (dense then mask)
and a fast form (visible sites only) with the same meaning.

Layout, each file standing on those before it: ``ops`` (the shared vocabulary and error),
``tiles`` (``SparseMap``, its geometry and halos), ``context`` (what the handlers of one forward
pass need: masks, grid questions, errors, geometries), ``reference`` (reference handlers),
``algebra`` (shape, index, split, join and reduction ops on tiles), ``fast`` (fast layer kernels),
``table`` (the one registry of layers, both forms side by side), ``mode`` (the two torch function
modes: dispatch only, handing the handlers their context), ``form`` (the choice of form for one
forward pass)."""

from .form import SPARSE_IMPLS, SparseForm, sparse_form
from .mode import FastSparseMode, SparseMode
from .ops import SparseSemanticsError
from .tiles import SparseMap, supports_fast, to_dense

__all__ = ["FastSparseMode", "SPARSE_IMPLS", "SparseForm", "SparseMap", "SparseMode", "SparseSemanticsError",
           "sparse_form", "supports_fast", "to_dense"]
