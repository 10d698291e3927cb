"""The vocabulary both sparse forms share: the kinds of torch operations a model may apply to a
feature map, the error raised for anything else, and small argument helpers.

Layers with a spatial or statistical meaning (convolution, pooling, norms, ...) are looked up
by torch function in :mod:`.table`. Every other operation is classified by its ``__name__``
into one :class:`OpKind`; each form then gives each kind its meaning (the reference form in
:class:`~.mode.SparseMode`, the fast form's translations onto tiles in :mod:`.algebra`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from torch import Tensor

from ..masking import per_axis

__all__ = ["SparseSemanticsError", "OpKind", "KIND_OF", "PASS_THROUGH", "REARRANGING", "MASKED_REDUCTIONS",
           "ONE_DIM_REDUCTIONS", "SCANS", "METADATA_PROPERTIES", "ON_CANVAS", "is_inplace", "tensors",
           "take_reduction_dim", "reduced_dims", "adaptive_output_size", "keeps_spatial"]


class SparseSemanticsError(RuntimeError):
    """A model performs an operation on a masked feature map that has no known sparse meaning."""


class OpKind(enum.Enum):
    """What an operation does to a feature map, as far as its sites are concerned."""

    METADATA = "metadata"  # sizes, strides, flags: answered from the logical shape
    PROPERTY = "property"  # a Tensor attribute read (``__get__``)
    ELEMENTWISE = "elementwise"  # arithmetic, activations, comparisons, casts, random fills: site by site
    CREATE = "create"  # ``new_*``: a fresh dense tensor of a given shape
    LIKE = "like"  # ``*_like``: a fresh tensor shaped like the input
    LAYOUT = "layout"  # memory layout only
    MOVE = "move"  # ``to``: dtype, device, memory format
    BROADCAST = "broadcast"  # size-1 dims repeated, dims added in front: never moves a site
    RESHAPE = "reshape"  # views and reshapes: fine while the spatial dims survive intact
    PERMUTE = "permute"
    SPLIT = "split"  # several parts along one dim
    SLICE = "slice"  # one part along one dim
    INDEX = "index"  # ``__getitem__``
    JOIN = "join"  # concatenation and stacking
    REDUCTION = "reduction"  # reductions, and scans / normalisations along one dim


_NAMES = {
    OpKind.METADATA: """
        size dim ndimension numel stride is_contiguous element_size data_ptr storage_offset get_device
        is_floating_point is_complex __len__ __hash__ __format__ __index__ _assert""",
    OpKind.PROPERTY: "__get__",
    OpKind.ELEMENTWISE: """
        add add_ sub sub_ mul mul_ div div_ true_divide neg neg_ abs abs_ pow pow_ square sqrt rsqrt exp log
        log1p expm1 reciprocal sign clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ lerp
        maximum minimum fmax fmin addcmul addcmul_ addcdiv addcdiv_ where masked_fill masked_fill_ erf erf_
        __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
        __rtruediv__ __itruediv__ __neg__ __pos__ __pow__ __rpow__ __ipow__ __abs__ __eq__ __ne__ __lt__
        __le__ __gt__ __ge__ __and__ __or__ __invert__ __bool__ eq ne lt le gt ge logical_not logical_and
        logical_or isfinite isnan isinf nan_to_num
        relu relu_ relu6 sigmoid sigmoid_ tanh tanh_ gelu silu silu_ mish mish_ hardswish hardswish_
        hardsigmoid hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_
        softplus softsign rrelu threshold threshold_ logsigmoid tanhshrink hardshrink softshrink
        dropout dropout_ dropout1d alpha_dropout feature_alpha_dropout bernoulli
        bernoulli_ uniform_ normal_ fill_ zero_ copy_ detach detach_ clone requires_grad_
        type type_as float double half bfloat16 int long bool cpu cuda
        __repr__ __int__ __float__ item tolist""",
    OpKind.CREATE: "new_empty new_zeros new_ones new_full new_tensor",
    OpKind.LIKE: "zeros_like ones_like empty_like full_like rand_like randn_like",
    OpKind.LAYOUT: "contiguous",
    OpKind.MOVE: "to",
    OpKind.BROADCAST: "expand expand_as broadcast_to",
    OpKind.RESHAPE: "view view_as reshape reshape_as flatten unflatten squeeze squeeze_ unsqueeze unsqueeze_",
    OpKind.PERMUTE: "permute transpose swapaxes swapdims movedim moveaxis",
    OpKind.SPLIT: "split split_with_sizes chunk unbind tensor_split",
    OpKind.SLICE: "narrow select",
    OpKind.INDEX: "__getitem__",
    OpKind.JOIN: "cat concat concatenate stack",
    OpKind.REDUCTION: """
        mean nanmean sum nansum amax amin max min norm vector_norm std var std_mean var_mean softmax
        log_softmax logsumexp prod argmax argmin cumsum cumprod""",
}


def _kind_of_name() -> dict[str, OpKind]:
    kinds: dict[str, OpKind] = {}
    for kind, names in _NAMES.items():
        for name in names.split():
            if name in kinds:
                raise AssertionError(f"'{name}' is listed as {kinds[name].value} and as {kind.value}")
            kinds[name] = kind
    return kinds


# A plain dict, never written after import (torch.compile traces lookups in dicts, but gives up on
# read-only mapping proxies as soon as any dict is written during the traced forward).
KIND_OF: dict[str, OpKind] = _kind_of_name()
"""The kind of every operation with a sparse meaning, by ``__name__``; absent names have none."""

# Kinds that never move a site (the reference form runs them unchanged) and kinds that may (the
# reference form checks that the spatial dims survive intact).
PASS_THROUGH = frozenset({OpKind.METADATA, OpKind.PROPERTY, OpKind.ELEMENTWISE, OpKind.CREATE, OpKind.LIKE,
                          OpKind.LAYOUT, OpKind.MOVE, OpKind.BROADCAST})
REARRANGING = frozenset({OpKind.RESHAPE, OpKind.PERMUTE, OpKind.SPLIT, OpKind.SLICE, OpKind.INDEX, OpKind.JOIN})

# Reductions that also have a meaning over both spatial dims (over visible sites only).
MASKED_REDUCTIONS = frozenset("mean nanmean sum nansum amax amin max min norm vector_norm".split())
# Reductions that take exactly one dim, and among them the scans / normalisations that keep the shape.
ONE_DIM_REDUCTIONS = frozenset("max min argmax argmin softmax log_softmax cumsum cumprod".split())
SCANS = frozenset("softmax log_softmax cumsum cumprod".split())

# Tensor properties that a map holding tiles answers from its logical shape or its tiles' metadata.
METADATA_PROPERTIES = frozenset(
    "shape dtype device ndim is_cuda is_cpu is_mps is_meta is_sparse is_quantized is_nested layout "
    "requires_grad names is_leaf grad_fn".split()
)

_INPLACE_DUNDERS = frozenset("__iadd__ __isub__ __imul__ __itruediv__ __ipow__ __iand__ __ior__".split())


def is_inplace(name: str) -> bool:
    """Whether the operation called ``name`` writes into its first argument."""
    return (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS


class _OnCanvas:
    def __repr__(self) -> str:
        return "ON_CANVAS"


ON_CANVAS = _OnCanvas()
"""What a fast layer handler returns for a call it has no row kernel for: the fast form then runs
the reference handler on the zero canvas and gathers the visible tiles back."""


def tensors(args, kwargs, kind: type = Tensor) -> Iterator:
    """The instances of ``kind`` among ``args`` and ``kwargs``' values, and one level into lists
    and tuples among them (as in ``torch.cat([a, b])``)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, kind):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (t for t in a if isinstance(t, kind))


def take_reduction_dim(name: str, rest: list, kwargs: dict):
    """Remove the ``dim`` argument of reduction ``name`` from ``kwargs`` (``dim``, or numpy's
    ``axis``) or from ``rest``, the positional arguments after the input, and return it (None
    when not given)."""
    if "dim" in kwargs:
        return kwargs.pop("dim")
    if "axis" in kwargs:
        return kwargs.pop("axis")
    position = 1 if name in ("norm", "vector_norm") else 0  # torch.norm(input, p, dim, ...)
    return rest.pop(position) if len(rest) > position else None


def reduced_dims(dim, ndim: int) -> tuple[int, ...]:
    """The dims (ascending, non-negative) a reduction over ``dim`` covers: all for None or ``()``."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return tuple(range(ndim))
    if isinstance(dim, (tuple, list)):
        return tuple(sorted({d % ndim for d in dim}))
    return (dim % ndim,)


def adaptive_output_size(output_size, shape, n: int = 2) -> tuple:
    """The spatial size an adaptive pooling (over the last ``n`` dims) of a map of ``shape`` produces."""
    return tuple(shape[-n + i] if s is None else s for i, s in enumerate(per_axis(output_size, n)))


def keeps_spatial(t: Tensor, batch: int, sizes: tuple[int, ...]) -> bool:
    """Whether ``t`` still holds a map of spatial ``sizes`` of ``batch`` samples, channels first or last."""
    n = len(sizes)
    if t.dim() < n + 1 or t.shape[0] != batch:
        return False
    if tuple(t.shape[-n:]) == tuple(sizes):
        return True
    return t.dim() == n + 2 and tuple(t.shape[1: n + 1]) == tuple(sizes)
