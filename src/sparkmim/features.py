"""Where a convnet's hierarchical feature maps come from: feature modules, strides and channels.

:func:`discover_features` reads timm's ``feature_info`` when the model has it, and otherwise runs
one dense probe forward that records the output size of every module and the order in which
modules finish: for each stride (4, 8, 16, 32, ...) the last module with that stride gives the
feature map. The module that finishes last among the chosen ones is where an encoder's forward
may stop (:class:`_StopForward`), so a classifier head is never run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .masking import shown_size
from .sparse import SparseSemanticsError

__all__ = ["FeatureSpec", "discover_features"]


class _StopForward(Exception):
    """Raised by the hook of the last feature module so the rest of the model (its head) is skipped."""


class FeatureSpec:
    """Where one feature map comes from: module name, stride and channel count."""

    def __init__(self, module: str, stride: tuple[int, ...], channels: int):
        self.module, self.stride, self.channels = module, tuple(stride), channels  # stride: one per axis

    def __repr__(self) -> str:
        return f"FeatureSpec(module={self.module!r}, stride={self.stride}, channels={self.channels})"


def _first_conv_in_chans(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m.in_channels
    return 3


def spatial_dims_of(model: nn.Module) -> int:
    """3 when the model's first convolution is 3-D (volumes, clips), else 2 (images)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return 3 if isinstance(m, nn.Conv3d) else 2
    return 2


def _param_kwargs(model: nn.Module) -> dict:
    p = next(iter(model.parameters()), None)
    if p is None:
        return {}
    return {"device": p.device, "dtype": p.dtype}


def _pick_tensor(out, size: tuple[int, ...] | None = None):
    """A module's output as one feature map: the tensor itself, or the element of a list/tuple
    (multi-branch stages such as HRNet's) with the wanted spatial size (of 2 or 3 dims)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (list, tuple)):
        n = 2 if size is None else len(size)
        for t in out:
            if isinstance(t, Tensor) and t.dim() == n + 2 and (size is None or tuple(t.shape[-n:]) == size):
                return t
    return None


# layer classes of self-attention models; ResNeSt's and SK-Net's attention over channels is supported
_ATTENTION = re.compile(r"attn|attention|transformer|lambdalayer", re.IGNORECASE)
_CHANNEL_ATTENTION = ("SplitAttn", "SelectiveKernelAttn")


def is_self_attention(m: nn.Module) -> bool:
    """Whether ``m``'s class is a self-attention or windowed-attention layer (by name)."""
    return bool(_ATTENTION.search(type(m).__name__)) and type(m).__name__ not in _CHANNEL_ATTENTION


def attention_after_features(model: nn.Module, reached: set[int]) -> str | None:
    """Why ``model`` cannot be pre-trained when the feature maps reach only the parameters whose
    ``id`` is in ``reached``: its self-attention layers lie after the last feature map and hold
    more parameters than the layers before it (a transformer whose token maps are not feature
    maps on the mask grid, such as a 3-D Swin after its patch embedding); else None."""
    layers = [(n, m) for n, m in model.named_modules() if n and is_self_attention(m)]
    left = {id(q): q.numel() for _, m in layers for q in m.parameters() if id(q) not in reached}
    before = sum(q.numel() for q in model.parameters() if id(q) in reached)
    if not layers or sum(left.values()) <= before:
        return None
    name, first = next((n, m) for n, m in layers if any(id(q) in left for q in m.parameters()))
    return (f"{type(model).__name__} has self-attention or windowed layers after its last feature map on the "
            f"mask grid ('{name}', {type(first).__name__}; {sum(left.values()):,} parameters there against "
            f"{before:,} before): it is not a convolutional network sparkmim can make sparse (attention mixes "
            f"all positions), and pre-training the layers before it alone would leave the rest untrained. "
            f"See docs/backbones.md")


def _probe_failure(model: nn.Module, running: list[nn.Module], names: dict, size: str, chans: int,
                   error: Exception) -> str:
    """Why a dense probe forward failed, naming the layer that raised; for self-attention and
    fixed-size models (ViT, Swin, BoTNet, MaxViT, ...) says that they cannot be made sparse."""
    layer = running[-1] if running else model
    where = f"layer '{names.get(layer) or type(model).__name__}' ({type(layer).__name__})"
    reason = " ".join(str(error).split()).rstrip(".")
    reason = f"{type(error).__name__}: {reason}" if reason else f"{type(error).__name__} (no message)"

    layers = [m for _, m in list(model.named_modules())[1:]]
    attention = [m for m in running if is_self_attention(m)] or [m for m in layers if is_self_attention(m)]
    text = (f"a probe forward of {type(model).__name__} on a {size} input with {chans} channels failed "
            f"in {where}: {reason}")
    if attention:
        first = attention[0]
        text += (f". {type(model).__name__} has self-attention or windowed layers ('{names.get(first, '?')}', "
                 f"{type(first).__name__}) and a fixed input size: it is not a convolutional network sparkmim can "
                 f"make sparse (attention mixes all positions). See docs/backbones.md")
    return text


def _timm_feature_modules(model: nn.Module, min_stride: int) -> list[str] | None:
    """The modules timm's ``feature_info`` names, one per stride >= ``min_stride``; None when the
    model has no usable ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not (isinstance(info, list) and info and isinstance(info[0], dict) and "module" in info[0]):
        return None
    by_stride = {d["reduction"]: d["module"] for d in info if d["reduction"] >= min_stride}
    names = [by_stride[k] for k in sorted(by_stride)]
    try:
        for n in names:
            model.get_submodule(n)
    except AttributeError:  # names of timm's features_only wrapper, not of this model
        return None
    return names


class _Probe:
    """One dense forward that records, for candidate modules, the output shape (and, for stages
    returning several maps, the outputs themselves) and the order in which they finish."""

    def __init__(self, model: nn.Module, candidates: dict[str, nn.Module], spatial_dims: int = 2):
        self.model, self.candidates, self.spatial_dims = model, candidates, spatial_dims
        self.seen: dict[str, tuple[tuple[int, ...], list | tuple | None]] = {}
        self.calls: dict[str, list[tuple[int, ...]]] = {}  # the output shape of each call, per module
        self.order: list[str] = []
        # the modules being run, outermost first (a module leaves the list only when it finishes,
        # so after a failure the list ends with the layer that raised)
        self.running: list[nn.Module] = []

    def _recorder(self, name: str):
        def hook(module, args, out):
            t = _pick_tensor(out)
            if t is not None:
                self.seen[name] = (tuple(t.shape), out if isinstance(out, (list, tuple)) else None)
                self.calls.setdefault(name, []).append(tuple(t.shape))
                if name in self.order:
                    self.order.remove(name)
                self.order.append(name)

        return hook

    def _enter(self, module, args):
        self.running.append(module)

    def _leave(self, module, args, out):
        self.running.pop()

    def run(self, in_chans: int, size: int) -> None:
        model = self.model
        handles = [m.register_forward_hook(self._recorder(n)) for n, m in self.candidates.items()]
        handles += [m.register_forward_pre_hook(self._enter) for m in model.modules()]
        handles += [m.register_forward_hook(self._leave) for m in model.modules()]
        was_training = model.training
        model.eval()
        try:
            x = torch.zeros(1, in_chans, *self.shape(size), **_param_kwargs(model))
            (getattr(model, "forward_features", None) or model)(x)
        except Exception as e:
            names = {m: n for n, m in model.named_modules()}
            shown = "x".join(map(str, self.shape(size)))
            raise SparseSemanticsError(_probe_failure(model, self.running, names, shown, in_chans, e)) from e
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    def shape(self, size: int) -> tuple[int, ...]:
        """The probe's spatial shape: ``size`` along every axis."""
        return (size,) * self.spatial_dims

    def stride_of(self, name: str, size: int) -> tuple[int, ...] | None:
        """The stride, one per axis, of a module's single output map (at least 2 sites along each
        axis, dividing the probe), or None."""
        shape, multi = self.seen[name]
        if multi is not None:  # multi-branch stage: its branches are picked by the listed order
            return None
        out = shape[2:]
        if len(out) != self.spatial_dims or any(o <= 1 or size % o for o in out):
            return None
        return tuple(size // o for o in out)


def _specs_of_named(probe: _Probe, names: Sequence[str], size: int, min_stride: int) -> list[FeatureSpec]:
    """Specs of the listed modules; a stage returning several resolutions gives, as the i-th
    listed module, its map at stride ``min_stride * 2**i``."""
    specs: list[FeatureSpec] = []
    expected: tuple[int, ...] | None = None
    n_dims = probe.spatial_dims
    for n in names:
        if n not in probe.seen:
            raise ValueError(f"feature module '{n}' produced no {n_dims + 2}-D feature map in a probe forward")
        calls = probe.calls.get(n, [])
        if len(calls) > 1:
            shown = ", ".join("x".join(map(str, c[2:])) for c in calls)
            raise ValueError(f"feature module '{n}' runs {len(calls)} times in one forward (outputs {shown}): name "
                             f"a module that runs once, e.g. the layer before it")
        shape, multi = probe.seen[n]
        if multi is not None:
            expected = (min_stride,) * n_dims if expected is None else tuple(2 * e for e in expected)
            t = next((t for t in multi if t.dim() == n_dims + 2
                      and tuple(size // o for o in t.shape[2:]) == expected), None)
            if t is None:
                raise ValueError(f"feature module '{n}' has no output at stride {shown_size(expected)}")
            specs.append(FeatureSpec(n, expected, t.shape[1]))
            continue
        s = probe.stride_of(n, size)
        if s is None:
            shown = "x".join(map(str, probe.shape(size)))
            raise ValueError(f"feature module '{n}' output {shape} is not a map of a {shown} probe (at least 2 sites "
                             f"along each axis, dividing the probe)")
        if all(a == 1 for a in s):
            raise ValueError(f"feature module '{n}' is at the input's resolution (stride 1): SparK's decoder and "
                             f"a segmentation decoder take strided maps only; list the stages after the first "
                             f"stride")
        expected = s
        specs.append(FeatureSpec(n, s, shape[1]))
    return specs


def _is_padding(module: nn.Module) -> bool:
    """A padding layer of torch (``ConstantPad2d``, ``ZeroPad3d``, ``ReflectionPad2d``, ...)."""
    return type(module).__module__ == nn.modules.padding.__name__


def _coarser(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether stride ``b`` is a whole multiple of stride ``a`` along each axis and on the
    decoder's ladder: the factors ``b / a`` along the axes are ``min(k, b)`` for one ``k`` (so
    ``(8, 16, 16)`` takes ``(2, 4, 4)`` but not ``(1, 4, 4)``, the middle of a (2+1)-D
    factorised block, which strides the two spatial axes before the temporal one)."""
    if any(y % x for x, y in zip(a, b)):
        return False
    factors = [y // x for x, y in zip(a, b)]
    k = max(factors)
    return all(f == min(k, y) for f, y in zip(factors, b))


def _reduction(stride: tuple[int, ...]) -> int:
    """How much a stride shrinks a map: its product over the axes."""
    return math.prod(stride)


def _specs_by_stride(probe: _Probe, size: int, min_stride: int) -> list[FeatureSpec]:
    """For each stride >= ``min_stride`` (along the most strided axis, for 3-D models) dividing
    the largest, the last module to finish with it. Modules that run more than once in a forward
    (an activation module shared by the stem and the head) and padding layers (their output is the
    next layer's padded input, whose size can pass for a coarser or finer stride) are no feature
    maps."""
    by_stride: dict = {}
    for n in probe.order:  # later modules override earlier ones at the same stride
        if len(probe.calls.get(n, ())) > 1 or _is_padding(probe.candidates[n]):
            continue
        s = probe.stride_of(n, size)
        if s is not None and max(s) >= min_stride:
            by_stride[s] = n
    if not by_stride:
        raise ValueError(f"no module of {type(probe.model).__name__} produced a feature map with stride >= {min_stride}")
    top = max(by_stride, key=_reduction)
    return [FeatureSpec(by_stride[s], s, probe.seen[by_stride[s]][0][1])
            for s in sorted(by_stride, key=_reduction) if _coarser(s, top)]


@torch.no_grad()
def discover_features(model: nn.Module, names: Sequence[str] | None, in_chans: int, probe_size: int,
                      min_stride: int, spatial_dims: int = 2) -> tuple[list[FeatureSpec], str]:
    """The feature maps of ``model`` (ascending stride) and the name of the feature module that
    finishes last (where a forward may stop).

    ``names``: the feature modules, or None to read timm's ``feature_info`` or else pick, for each
    stride, the last module with that stride in a dense probe forward on a ``probe_size`` square
    (a cube for ``spatial_dims=3``, whose strides are one per axis). A probe forward that fails raises :class:`SparseSemanticsError` naming the failing layer."""
    if names is None:
        names = _timm_feature_modules(model, min_stride)
    candidates = dict(model.named_modules()) if names is None else {n: model.get_submodule(n) for n in names}
    candidates.pop("", None)
    probe = _Probe(model, candidates, spatial_dims)
    probe.run(in_chans, probe_size)
    if names is not None:
        specs = _specs_of_named(probe, names, probe_size, min_stride)
    else:
        specs = _specs_by_stride(probe, probe_size, min_stride)
    specs.sort(key=lambda s: _reduction(s.stride))
    if len({s.stride for s in specs}) != len(specs):
        raise ValueError(f"feature modules must have distinct strides, got {specs}")
    finish = {n: i for i, n in enumerate(probe.order)}
    stop_at = max((s.module for s in specs), key=lambda n: finish.get(n, -1))
    return specs, stop_at
