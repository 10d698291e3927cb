"""Sparse semantics for an unmodified convnet, applied per call through a torch function mode.

While a :class:`SparseMode` is active (only inside ``SparseEncoder.forward``), every torch
operation the model performs passes through :meth:`SparseMode.__torch_function__`. Feature maps
"on the mask grid" (spatial size a whole multiple of the patch grid, batch size of the mask)
are treated as sparse: masked sites are absent.

* a masked site acts like padding: convolution and interpolation read it as zero, max pooling
  ignores it, average pooling counts it as zero or leaves it out of the mean exactly as it does
  padding (``count_include_pad``); outputs exist at visible sites only;
* batch norm computes batch statistics (and updates running statistics) from visible sites
  only; group and instance norm use per-sample statistics over visible sites;
* global reductions over the spatial dims (the mean in squeeze-excitation, ECA, split
  attention, the spatial norm of GRN, adaptive pooling to 1x1) run over visible sites only;
* per-site operations (activations, 1x1 work on channels-last tensors, LayerNorm over
  channels, reshapes that keep the spatial dims) run unchanged;
* anything else that touches a feature map on the grid raises :class:`SparseSemanticsError`
  naming the operation, so a model the converter does not understand is never run with a
  silent leak.

Tensors that are not on the grid (a pooled ``1 x 1`` vector inside a squeeze-excitation block,
a weight being standardised) are dense and pass through untouched.

This is the reference implementation: each layer runs densely and the result is masked, which
is simple and obviously equal to the sparse definition. No state outside the mode instance is
used, so encoders can run concurrently, and the mode is traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..masking import MaskPyramid
from ..norms import batch_norm_rows, like_format, masked_batch_norm
from ..norms import masked_group_stats_norm as _masked_group_stats_norm

__all__ = ["SparseMode", "SparseSemanticsError", "masked_batch_norm", "batch_norm_rows", "like_format"]


class SparseSemanticsError(RuntimeError):
    """A model performs an operation on a masked feature map that has no known sparse meaning."""


def _pair(v) -> tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v) if len(v) == 2 else (v[0], v[0])
    return (v, v)


# Operations that act on each site independently (elementwise, casts, metadata) or create tensors.
_PER_SITE = frozenset(
    """
    add add_ sub sub_ mul mul_ div div_ true_divide neg neg_ abs abs_ pow pow_ square sqrt rsqrt exp log
    log1p expm1 reciprocal sign clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ lerp
    maximum minimum fmax fmin addcmul addcmul_ addcdiv addcdiv_ where masked_fill masked_fill_ erf erf_
    __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__
    __rtruediv__ __itruediv__ __neg__ __pos__ __pow__ __rpow__ __ipow__ __abs__ __eq__ __ne__ __lt__
    __le__ __gt__ __ge__ __and__ __or__ __invert__ __bool__ eq ne lt le gt ge logical_not logical_and
    logical_or isfinite isnan isinf nan_to_num
    relu relu_ relu6 sigmoid sigmoid_ tanh tanh_ gelu silu silu_ mish mish_ hardswish hardswish_
    hardsigmoid hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_
    softplus softsign prelu rrelu threshold threshold_ logsigmoid tanhshrink hardshrink softshrink
    dropout dropout_ dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout bernoulli
    bernoulli_ uniform_ normal_ fill_ zero_ copy_ detach detach_ clone contiguous requires_grad_
    to type type_as float double half bfloat16 int long bool cpu cuda
    new_empty new_zeros new_ones new_full new_tensor zeros_like ones_like empty_like full_like
    rand_like randn_like expand expand_as broadcast_to
    size dim ndimension numel stride is_contiguous element_size data_ptr storage_offset get_device
    is_floating_point is_complex __get__ __len__ __hash__ __format__ __repr__ __index__ __int__
    __float__ _assert item tolist
    """.split()
)

# Operations that rearrange a tensor; allowed when the spatial dims survive intact.
_REARRANGE = frozenset(
    """
    view view_as reshape reshape_as permute transpose flatten unflatten squeeze squeeze_ unsqueeze
    unsqueeze_ split split_with_sizes chunk unbind tensor_split __getitem__ cat concat concatenate
    stack narrow select movedim moveaxis swapaxes swapdims
    """.split()
)

# Reductions: fine over channel or group dims; over both spatial dims only where a masked
# meaning is implemented (see _MASKED_REDUCTIONS).
_REDUCTIONS = frozenset(
    """
    mean nanmean sum nansum amax amin max min norm vector_norm std var std_mean var_mean softmax
    log_softmax logsumexp prod argmax argmin cumsum cumprod
    """.split()
)
_MASKED_REDUCTIONS = frozenset("mean nanmean sum nansum amax amin max min norm vector_norm".split())


class SparseMode(TorchFunctionMode):
    """Sparse semantics for one forward pass of one encoder, for one batch's masks."""

    def __init__(self, masks: MaskPyramid, path: list[tuple[str, str]] | None = None, sync_group=None):
        super().__init__()
        self.masks = masks
        self.sync_group = sync_group  # process group for batch statistics across ranks, or None
        self.batch = masks.batch
        self.path = path  # (module name, type) stack, kept only while probing a model at build time

    # -- layout helpers -------------------------------------------------------------------
    def cf_factor(self, t) -> int | None:
        """Factor of a channels-first map ``(B, ..., H, W)`` on the mask grid, else None."""
        if not isinstance(t, Tensor) or t.dim() < 3 or t.shape[0] != self.batch:
            return None
        return self.masks.factor(t.shape[-2], t.shape[-1])

    def cl_factor(self, t) -> int | None:
        """Factor of a channels-last map ``(B, H, W, C)`` on the mask grid, else None."""
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != self.batch:
            return None
        return self.masks.factor(t.shape[1], t.shape[2])

    def cf_mask(self, t: Tensor, factor: int) -> Tensor:
        m = self.masks.at(factor)
        if t.dim() == 4:
            return m
        return m.view(self.batch, *([1] * (t.dim() - 3)), m.shape[-2], m.shape[-1])

    def cl_mask(self, factor: int) -> Tensor:
        return self.masks.at(factor).permute(0, 2, 3, 1)

    def mask_input(self, x):
        f = self.cf_factor(x)
        return x if f is None else torch.where(self.cf_mask(x, f), x, 0.0)

    def mask_output(self, out, func):
        if isinstance(out, (tuple, list)):
            return type(out)([self.mask_output(out[0], func), *out[1:]])
        f = self.cf_factor(out)
        if f is not None:
            return torch.where(self.cf_mask(out, f), out, 0.0)
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[0] == self.batch and out.shape[-2] * out.shape[-1] > 1:
            self.fail(func, out, "produces a feature map whose size is not a multiple of the patch grid")
        return out

    def fail(self, func, t, why: str):
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        where = f" in module '{self.path[-1][0]}' ({self.path[-1][1]})" if self.path else ""
        shape = tuple(t.shape) if isinstance(t, Tensor) else t
        raise SparseSemanticsError(
            f"operation '{name}'{where} on a tensor of shape {shape} {why}; the sparse encoder cannot "
            f"apply it without letting masked positions leak. See the README section 'Supported backbones'."
        )

    # -- dispatch --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            handler = _HANDLERS.get(func)
        except TypeError:  # unhashable callable
            handler = None
        if handler is not None:
            return handler(self, func, *args, **kwargs)
        name = getattr(func, "__name__", None)
        if name in _PER_SITE:
            return func(*args, **kwargs)
        if name in _REARRANGE:
            return self._rearrange(func, args, kwargs)
        if name in _REDUCTIONS:
            return self._reduce(func, name, args, kwargs)
        out = func(*args, **kwargs)
        if any(isinstance(o, Tensor) for o in (out if isinstance(out, (tuple, list)) else (out,))):
            # a tensor computed from a masked map by an operation of unknown meaning: refuse
            for t in _tensors(args, kwargs):
                if self.cf_factor(t) is not None or self.cl_factor(t) is not None:
                    self.fail(func, t, "is not known to have a sparse meaning")
        return out  # metadata queries (is_*, sizes, flags) return no tensor

    def _rearrange(self, func, args, kwargs):
        grid_in = [t for t in _tensors(args[:1], {}) if self.cf_factor(t) or self.cl_factor(t)]
        out = func(*args, **kwargs)
        if grid_in:
            h, w = _spatial_of(self, grid_in[0])
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, Tensor) and not _keeps_spatial(o, self.batch, h, w):
                    self.fail(func, grid_in[0], f"rearranges the spatial dims (result {tuple(o.shape)})")
        return out

    def _reduce(self, func, name, args, kwargs):
        x = args[0]
        if not isinstance(x, Tensor):
            return func(*args, **kwargs)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], Tensor):
            return func(*args, **kwargs)  # elementwise maximum/minimum
        cf, cl = self.cf_factor(x), self.cl_factor(x)
        if cf is None and cl is None:
            return func(*args, **kwargs)
        pos = 2 if name in ("norm", "vector_norm") else 1
        dim = kwargs.get("dim", kwargs.get("axis", args[pos] if len(args) > pos else None))
        nd = x.dim()
        if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
            dims = set(range(nd))
        elif isinstance(dim, (tuple, list)):
            dims = {d % nd for d in dim}
        else:
            dims = {dim % nd}
        mask = None
        if cf is not None and {nd - 2, nd - 1} <= dims:
            mask = self.cf_mask(x, cf)
        elif cl is not None and {1, 2} <= dims:
            mask = self.cl_mask(cl)
        else:
            untouched = (cf is not None and not dims & {nd - 2, nd - 1}) or (cl is not None and not dims & {1, 2})
            if untouched:
                return func(*args, **kwargs)
            self.fail(func, x, f"reduces over part of the spatial dims (dims {sorted(dims)})")
        if name not in _MASKED_REDUCTIONS:
            self.fail(func, x, f"reduces over the spatial dims with '{name}', which has no masked form here")
        rest = args[1:]
        if name in ("amax", "max"):
            return func(x.masked_fill(~mask, float("-inf")), *rest, **kwargs)
        if name in ("amin", "min"):
            return func(x.masked_fill(~mask, float("inf")), *rest, **kwargs)
        kept = torch.where(mask, x, 0.0)
        if name in ("mean", "nanmean"):
            fraction = func(mask.to(x.dtype).expand_as(x), *rest, **kwargs)
            return func(kept, *rest, **kwargs) / fraction
        return func(kept, *rest, **kwargs)


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (t for t in a if isinstance(t, Tensor))


def _spatial_of(mode: SparseMode, t: Tensor) -> tuple[int, int]:
    if mode.cf_factor(t) is not None:
        return t.shape[-2], t.shape[-1]
    return t.shape[1], t.shape[2]


def _keeps_spatial(o: Tensor, batch: int, h: int, w: int) -> bool:
    if o.dim() < 3 or o.shape[0] != batch:
        return False
    if o.shape[-2] == h and o.shape[-1] == w:
        return True
    return o.dim() == 4 and o.shape[1] == h and o.shape[2] == w


# -- handlers for layers with a spatial or statistical meaning ---------------------------------
def _conv(mode: SparseMode, func, x, /, *args, **kwargs):
    return mode.mask_output(func(mode.mask_input(x), *args, **kwargs), func)


def _avg_pool(mode: SparseMode, func, x, kernel_size, stride=None, padding=0, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    """Masked sites act as padding: counted as zeros when padding is, else left out of the mean."""
    f = mode.cf_factor(x)
    args = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    if f is None or count_include_pad or divisor_override is not None:
        return mode.mask_output(func(mode.mask_input(x), *args), func)
    visible = mode.cf_mask(x, f)
    total = func(torch.where(visible, x, 0.0), *args)
    share = func(visible.to(x.dtype), *args)  # fraction of each window's non-padding sites that are visible
    return mode.mask_output(total / share.clamp_min(torch.finfo(x.dtype).tiny), func)


def _max_pool(mode: SparseMode, func, x, /, *args, **kwargs):
    f = mode.cf_factor(x)
    if f is not None:
        x = x.masked_fill(~mode.cf_mask(x, f), float("-inf"))
    return mode.mask_output(func(x, *args, **kwargs), func)


def _adaptive_pool(mode: SparseMode, func, x, output_size, /, *args, **kwargs):
    f = mode.cf_factor(x)
    if f is None:
        return func(x, output_size, *args, **kwargs)
    size = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(_pair(output_size)))
    if size == tuple(x.shape[-2:]):
        return mode.mask_output(x, func)
    if size != (1, 1) or args or kwargs.get("return_indices"):
        mode.fail(func, x, f"pools to {size}, which only has a sparse meaning for 1x1")
    mask = mode.cf_mask(x, f)
    if func is F.adaptive_max_pool2d:
        return x.masked_fill(~mask, float("-inf")).amax(dim=(-2, -1), keepdim=True)
    kept = torch.where(mask, x, 0.0).sum(dim=(-2, -1), keepdim=True)
    return kept / mask.sum(dim=(-2, -1), keepdim=True).to(x.dtype)


def _batch_norm(mode: SparseMode, func, x, running_mean, running_var, weight=None, bias=None,
                training=False, momentum=0.1, eps=1e-5):
    f = mode.cf_factor(x)
    if f is None:
        return func(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if x.dim() != 4:
        mode.fail(func, x, "is a batch norm over a map that is not 4-D")
    return masked_batch_norm(x, mode.masks, f, running_mean, running_var, weight, bias, training, momentum, eps,
                             mode.sync_group)


def _group_norm(mode: SparseMode, func, x, num_groups, weight=None, bias=None, eps=1e-5):
    f = mode.cf_factor(x)
    if f is None:
        return func(x, num_groups, weight, bias, eps)
    if x.dim() != 4:
        mode.fail(func, x, "is a group norm over a map that is not 4-D")
    return _masked_group_stats_norm(x, mode.masks.at(f), num_groups, weight, bias, eps)


def _instance_norm(mode: SparseMode, func, x, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    f = mode.cf_factor(x)
    if f is None:
        return func(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if not use_input_stats:
        return mode.mask_output(func(x, running_mean, running_var, weight, bias, False, momentum, eps), func)
    if running_mean is not None or x.dim() != 4:
        mode.fail(func, x, "is an instance norm with running statistics, which is not supported")
    return _masked_group_stats_norm(x, mode.masks.at(f), x.shape[1], weight, bias, eps)


def _per_channel_norm(mode: SparseMode, func, x, normalized_shape, /, *args, **kwargs):
    """LayerNorm / RMSNorm: per site when normalising the channels of a channels-last map."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    if mode.cl_factor(x) is not None and n == 1:
        return func(x, normalized_shape, *args, **kwargs)
    if mode.cf_factor(x) is not None:
        mode.fail(func, x, "normalises over spatial dims")
    return func(x, normalized_shape, *args, **kwargs)


def _linear(mode: SparseMode, func, x, /, *args, **kwargs):
    if mode.cf_factor(x) is not None and mode.cl_factor(x) is None:
        mode.fail(func, x, "mixes the width dim of a channels-first map")
    return func(x, *args, **kwargs)


def _pad(mode: SparseMode, func, x, /, *args, **kwargs):
    return func(mode.mask_input(x), *args, **kwargs)


_HANDLERS = {
    F.conv2d: _conv,
    F.conv_transpose2d: _conv,
    F.avg_pool2d: _avg_pool,
    F.interpolate: _conv,
    F.upsample: _conv,
    F.max_pool2d: _max_pool,
    F.max_pool2d_with_indices: _max_pool,
    torch.max_pool2d: _max_pool,
    F.adaptive_avg_pool2d: _adaptive_pool,
    F.adaptive_max_pool2d: _adaptive_pool,
    F.batch_norm: _batch_norm,
    F.group_norm: _group_norm,
    F.instance_norm: _instance_norm,
    F.layer_norm: _per_channel_norm,
    F.linear: _linear,
    F.pad: _pad,
}


# Lower-level spellings of the same layers (seen when tracing under torch.compile): same meaning,
# different argument order.
def _aten_batch_norm(mode, func, x, weight, bias, running_mean, running_var, training, momentum, eps, *_):
    def call(x, running_mean, running_var, weight, bias, training, momentum, eps):
        return func(x, weight, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)

    return _batch_norm(mode, call, x, running_mean, running_var, weight, bias, training, momentum, eps)


def _aten_group_norm(mode, func, x, num_groups, weight=None, bias=None, eps=1e-5, *_):
    def call(x, num_groups, weight, bias, eps):
        return func(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)

    return _group_norm(mode, call, x, num_groups, weight, bias, eps)


def _aten_instance_norm(mode, func, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    def call(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
        return func(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                    torch.backends.cudnn.enabled)

    return _instance_norm(mode, call, x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


_HANDLERS.update({
    torch.convolution: _conv,
    torch._convolution: _conv,
    torch.conv_transpose2d: _conv,
    torch.batch_norm: _aten_batch_norm,
    torch.group_norm: _aten_group_norm,
    torch.instance_norm: _aten_instance_norm,
    torch.layer_norm: _per_channel_norm,
})
if hasattr(F, "_max_pool2d"):
    _HANDLERS[F._max_pool2d] = _max_pool
if hasattr(F, "rms_norm"):
    _HANDLERS[F.rms_norm] = _per_channel_norm
