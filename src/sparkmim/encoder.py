"""SparseEncoder: any convnet, unmodified, as a hierarchical sparse encoder."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .features import (
    FeatureSpec,
    _first_conv_in_chans,
    _param_kwargs,
    _pick_tensor,
    _StopForward,
    attention_after_features,
    discover_features,
    spatial_dims_of,
)
from .masking import MaskPyramid, grid_of
from .sparse import SPARSE_IMPLS, SparseSemanticsError, sparse_form

__all__ = ["SparseEncoder", "FeatureSpec", "SPARSE_IMPLS"]

# per number of spatial dims: the probe's side, the finest stride used, what the inputs are called
_PROBE_SIZE = {2: 128, 3: 64}
_MIN_STRIDE = {2: 4, 3: 2}
_INPUTS = {2: "images", 3: "volumes or clips"}
_AXES = ("D", "H", "W")


class _CaptureHook:
    """Forward hook of a feature module: records its output while its encoder is encoding.

    A small object rather than a closure, so that ``copy.deepcopy`` of an encoder yields hooks
    that report to the copy."""

    def __init__(self, owner: SparseEncoder, name: str):
        self.owner, self.name = owner, name

    def __call__(self, module, args, out):
        owner = self.owner
        if owner._capture is None:
            return None
        t = _pick_tensor(out, owner._sizes[self.name])
        if t is None:
            raise RuntimeError(f"feature module '{self.name}' did not return a feature map")
        owner._capture[self.name] = t
        if self.name == owner._stop_at:
            raise _StopForward
        return None


class SparseEncoder(nn.Module):
    """Wrap a convolutional network so that ``enc(x, visible)`` encodes only visible patches.

    Args:
        model: any ``nn.Module`` producing 2-D feature maps, or 3-D ones (volumes, clips: a
            model whose first convolution is a ``Conv3d``). It is used as is: no layer is
            replaced or edited, so ``enc.model.state_dict()`` has exactly the original keys.
        feature_modules: names of the submodules whose outputs are the hierarchical features.
            Default: read from timm's ``feature_info`` when present, else found by a probe
            forward (for each stride 4, 8, 16, 32, ... the last module with that stride).
        sparse: ``False`` gives the paper's "zero-out" ablation: the dense convnet runs on the
            masked image.
        sparse_impl: how the sparse semantics are computed (same results either way):
            ``"fast"`` (default) holds feature maps as their visible sites only and computes
            nothing at masked sites; ``"reference"`` runs every layer densely and masks the
            result. Masks with different visible counts per sample and forwards traced by
            ``torch.compile`` use the reference form. If the build-time check finds that only
            the reference form can run the model, the encoder is built in it, with a warning.
            Read it back as ``enc.sparse_impl``; ``with enc.using("reference"): ...`` computes
            in the other form for a block (comparisons, benchmarks).
        in_chans: input channels; default read from the first convolution.
        probe_size: image side used to discover strides (must be a multiple of the total stride;
            default 128, and 64 per side for 3-D models).
        min_stride: feature maps finer than this stride (along the most strided axis) are not
            used (the paper uses 4..32; for 3-D models the default is 2: video ResNets without
            a max pool reach 16, so their four scales are 2..16).
        check: run a sparse probe forward at build time, so an unsupported layer is reported
            now, with its module path, instead of during training.

    ``enc(x, visible)`` takes images ``(B, C, H, W)`` and a bool mask ``(B, 1, H/Ph, W/Pw)``
    (``True`` = visible; or a :class:`MaskPyramid`) and returns the feature maps at
    ``enc.strides`` (ascending), zero at masked sites. ``enc(x)`` runs the original dense model.
    For 3-D models the inputs are ``(B, C, D, H, W)`` and masks ``(B, 1, D/Pd, H/Ph, W/Pw)``.
    Every stride, ``patch_size`` and factor holds one value per spatial axis (``(32, 32)`` for
    a ResNet-50); ``factors`` are the sites per patch of each feature map.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_modules: Sequence[str] | None = None,
        *,
        sparse: bool = True,
        sparse_impl: str = "fast",
        in_chans: int | None = None,
        probe_size: int | None = None,
        min_stride: int | None = None,
        check: bool = True,
        spatial_dims: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.sparse = sparse
        self._impl = _checked_impl(sparse_impl)
        self.in_chans = in_chans or _first_conv_in_chans(model)
        self.spatial_dims = spatial_dims or spatial_dims_of(model)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        probe_size = probe_size or _PROBE_SIZE[self.spatial_dims]
        min_stride = min_stride or _MIN_STRIDE[self.spatial_dims]
        self._capture: dict[str, Tensor] | None = None
        self._index_constants: dict = {}  # the fast form's mask-independent index pieces, per device and layer shape
        self.sync_group = None  # set for batch statistics across ranks (sparse SyncBatchNorm)
        # parameters that do not reach any feature map (e.g. a classifier head), found by check()
        self.unused_parameters: list[str] | None = None
        specs, self._stop_at = discover_features(model, feature_modules, self.in_chans, probe_size, min_stride,
                                                 self.spatial_dims)
        self._discovered = feature_modules is None
        self.features: list[FeatureSpec] = specs
        self.strides = tuple(s.stride for s in specs)
        self.channels = tuple(s.channels for s in specs)
        self.patch_size = self.strides[-1]
        self.factors = tuple(tuple(p // a for p, a in zip(self.patch_size, s)) for s in self.strides)
        for s in specs:
            if any(a & (a - 1) for a in s.stride):
                raise ValueError(f"feature '{s.module}' has stride {s.stride}, which is not a power of 2")
        self._sizes: dict[str, tuple[int, ...]] = {}
        self._hooks = [self.model.get_submodule(s.module).register_forward_hook(_CaptureHook(self, s.module))
                       for s in specs]
        if check:
            self._impl = self.check()

    # -- construction helpers ------------------------------------------------------------------
    @classmethod
    def from_timm(cls, name: str, *, pretrained: bool = False, encoder_kwargs: dict | None = None,
                  **timm_kwargs) -> SparseEncoder:
        """Build ``timm.create_model(name, num_classes=0, **timm_kwargs)`` and wrap it."""
        from .backbones import create_timm

        return cls(create_timm(name, pretrained=pretrained, **timm_kwargs), **(encoder_kwargs or {}))

    @classmethod
    def from_torchvision(cls, name: str, *, encoder_kwargs: dict | None = None, **tv_kwargs) -> SparseEncoder:
        """Build a torchvision classification model (classifier removed) and wrap it."""
        from .backbones import create_torchvision

        return cls(create_torchvision(name, **tv_kwargs), **(encoder_kwargs or {}))

    def _run(self, x: Tensor) -> list[Tensor]:
        fn = getattr(self.model, "forward_features", None) or self.model
        n = self.spatial_dims
        self._sizes = {s.module: tuple(a // b for a, b in zip(x.shape[-n:], s.stride))
                       for s in self.features}
        self._capture = {}
        try:
            fn(x)
        except _StopForward:
            pass
        finally:
            captured, self._capture = self._capture, None
        missing = [s.module for s in self.features if s.module not in captured]
        if missing:
            raise RuntimeError(f"feature modules {missing} were not run by the model's forward")
        return [captured[s.module] for s in self.features]

    @property
    def sparse_impl(self) -> str:
        """The sparse form the encoder computes in (``"fast"`` or ``"reference"``)."""
        return self._impl

    @contextlib.contextmanager
    def using(self, sparse_impl: str) -> Iterator[SparseEncoder]:
        """Compute in the sparse form ``sparse_impl`` inside the ``with`` block (the same weights;
        for comparing the forms); the encoder's own form is back afterwards."""
        before, self._impl = self._impl, _checked_impl(sparse_impl)
        try:
            yield self
        finally:
            self._impl = before

    def check(self) -> str:
        """Run one sparse forward in training mode on a small non-square input and restore all
        state afterwards; raises :class:`SparseSemanticsError` naming the first unsupported layer.
        Returns the sparse form that runs the model: the encoder's own, or ``"reference"`` with a
        warning when the fast form cannot run it but the reference form can (same results, dense
        cost). It changes nothing: the constructor builds the encoder in the form returned."""
        if not self.sparse or self._impl != "fast":
            self._check(self._impl)
            return self._impl
        try:
            self._check("fast")
            return "fast"
        except Exception as fast_error:
            self._check("reference")
            warnings.warn(f"{type(self.model).__name__}: the fast sparse implementation failed ({fast_error}); "
                          f"using sparse_impl='reference', which gives the same results at the cost of dense "
                          f"layers", stacklevel=3)
            return "reference"

    @torch.no_grad()
    def _check(self, impl: str) -> None:
        p = self.patch_size
        kw = _param_kwargs(self.model)
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        modes = {m: m.training for m in self.model.modules()}
        path: list[tuple[str, str]] = []
        names = {m: n for n, m in self.model.named_modules()}

        def push(m, args):
            path.append((names[m], type(m).__name__))

        def pop(m, args, out):
            path.pop()

        handles = []
        for m in self.model.modules():
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop, always_call=True))
        try:
            self.model.train()
            last_error = None
            n = self.spatial_dims
            # a non-square (non-cubic) grid first, then a square one for models that need it
            grids = ((1,) * (n - 2) + (2, 3), (2,) * n)
            for grid in grids:
                sizes = [g * a for g, a in zip(grid, p)]
                x = torch.randn(2, self.in_chans, *sizes, generator=torch.Generator().manual_seed(0)).to(**kw)
                # two visible patches per sample, diagonal neighbours (sample 0) and the other pair (sample 1)
                visible = torch.zeros(2, 1, *grid, dtype=torch.bool, device=x.device)
                lead = (0,) * (n - 2)
                visible[(0, 0, *lead, 0, 0)] = visible[(0, 0, *lead, 1, 1)] = True
                visible[(1, 0, *lead, 0, 1)] = visible[(1, 0, *lead, 1, 0)] = True
                masks = MaskPyramid(visible, keep=2)
                try:
                    with torch.random.fork_rng(devices=[]), torch.enable_grad(), self.using(impl):
                        feats = self._encode(x, masks, path)
                except SparseSemanticsError:
                    raise
                except Exception as e:  # e.g. a model that only accepts square inputs
                    last_error = e
                    path.clear()
                    continue
                for f, s, factor in zip(feats, self.features, self.factors):
                    if masks.factor(*f.shape[-n:]) != factor:
                        raise SparseSemanticsError(
                            f"feature '{s.module}' has size {tuple(f.shape[-n:])} for a {tuple(x.shape[-n:])} input; "
                            f"expected stride {s.stride}"
                        )
                reached = _graph_leaves(feats)
                refusal = attention_after_features(self.model, reached) if self._discovered else None
                if refusal:
                    raise SparseSemanticsError(refusal)
                self.unused_parameters = [n for n, q in self.model.named_parameters()
                                          if q.requires_grad and id(q) not in reached]
                return
            reason = " ".join(str(last_error).split()) or "no message"
            raise SparseSemanticsError(f"the sparse probe forward of {type(self.model).__name__} on non-square inputs "
                                       f"failed: {type(last_error).__name__}: {reason}") from last_error
        finally:
            for h in handles:
                h.remove()
            for m, t in modes.items():
                m.training = t
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])

    # -- forward ---------------------------------------------------------------------------------
    def _encode(self, x: Tensor, masks: MaskPyramid, path=None) -> list[Tensor]:
        if not self.sparse:
            return self._run(torch.where(masks.at(self.patch_size), x, 0.0))
        form = sparse_form(self._impl, masks, self.sync_group, path, self._index_constants, self.patch_size)
        if not form.fast:  # the fast form keeps the visible tiles only; the reference form sees zeros there
            x = torch.where(masks.at(self.patch_size), x, 0.0)
        with form:
            feats = self._run(form.enter(x))
        return [form.exit(f, factor) for f, factor in zip(feats, self.factors)]

    def forward(self, x: Tensor, visible: Tensor | MaskPyramid | None = None) -> list[Tensor]:
        """Feature maps ``[(B, C_i, H / s_i, W / s_i)]`` for ``s_i`` in ``self.strides`` (and
        ``(B, C_i, D / s_i, H / s_i, W / s_i)``, per axis, for 3-D models)."""
        n = self.spatial_dims
        if x.dim() != n + 2 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected {_INPUTS[n]} of shape (B, {self.in_chans}, {', '.join(_AXES[-n:])}), "
                             f"got {tuple(x.shape)}")
        if visible is None:
            return self._run(x)
        grid = grid_of(tuple(x.shape[-n:]), self.patch_size)
        masks = visible if isinstance(visible, MaskPyramid) else MaskPyramid.from_visible(visible)
        if masks.grid != grid or masks.batch != x.shape[0]:
            raise ValueError(
                f"mask of grid {'x'.join(map(str, (masks.batch, *masks.grid)))} does not match inputs "
                f"{tuple(x.shape)} with patch size {self.patch_size} (expected "
                f"{'x'.join(map(str, (x.shape[0], *grid)))})"
            )
        return self._encode(x, masks)

    def extra_repr(self) -> str:
        return (f"strides={self.strides}, channels={self.channels}, sparse={self.sparse}, "
                f"sparse_impl={self.sparse_impl!r}")


def _checked_impl(impl: str) -> str:
    if impl not in SPARSE_IMPLS:
        raise ValueError(f"sparse_impl must be one of {SPARSE_IMPLS}, got {impl!r}")
    return impl


def _graph_leaves(outputs: list[Tensor]) -> set[int]:
    """``id`` of each leaf tensor (parameter) that the autograd graph of ``outputs`` reaches."""
    seen, leaves, stack = set(), set(), [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):  # AccumulateGrad
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves
