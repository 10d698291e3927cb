"""The one registry of layers with a sparse meaning: both forms side by side.

``RULES`` maps a torch function to a :class:`Rule`: its reference handler (dense, then mask;
:mod:`.reference`) and its fast handler (on tiles; :mod:`.fast`), or ``fast=None``, which says on
purpose that the fast form runs the reference handler on the zero canvas and gathers the visible
tiles back (rare layers, where a row kernel would not pay). A fast handler may also answer
:data:`~.ops.ON_CANVAS` for a call its kernels do not cover.

Lower-level spellings of the same layers (``torch.convolution``, ``torch.batch_norm``, ...,
seen when tracing under ``torch.compile`` or in hand-written modules) are rewritten once, here,
to the ``torch.nn.functional`` call with the same meaning (:data:`SPELLINGS`) before either
handler sees them, so every handler has the ``F.*`` signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import fast, reference

__all__ = ["Rule", "RULES", "SPELLINGS", "resolve"]

Handler = Callable[..., Any]  # (mode, func, *args, **kwargs) -> result


@dataclass(frozen=True)
class Rule:
    """The meaning of one layer in both forms.

    ``reference``: the handler of the reference form. ``fast``: the handler of the fast form,
    or None to run ``reference`` on the canvas (``fill`` at masked sites) and gather the tiles.
    """

    reference: Handler
    fast: Handler | None
    fill: float = 0.0


def _rules() -> dict[Callable, Rule]:
    masked_conv = Rule(reference.mask_in_out, fast=fast.conv)
    canvas = Rule(reference.mask_in_out, fast=None)
    max_pool = Rule(reference.max_pool, fast=fast.max_pool, fill=float("-inf"))
    adaptive_pool = Rule(reference.adaptive_pool, fast=fast.adaptive_pool)
    channel_norm = Rule(reference.channel_norm, fast=fast.channel_norm)
    rules = {
        F.conv2d: masked_conv,
        F.conv_transpose2d: canvas,
        # convolutions of other dimensionality (1-D), spelled torch.convolution (see _convolution)
        torch.convolution: canvas,
        torch._convolution: canvas,
        F.interpolate: canvas,
        F.upsample: canvas,
        F.avg_pool2d: Rule(reference.avg_pool, fast=fast.avg_pool),
        F.max_pool2d: max_pool,
        F.max_pool2d_with_indices: max_pool,
        torch.max_pool2d: max_pool,
        F.adaptive_avg_pool2d: adaptive_pool,
        F.adaptive_max_pool2d: adaptive_pool,
        F.batch_norm: Rule(reference.batch_norm, fast=fast.batch_norm),
        F.group_norm: Rule(reference.group_norm, fast=fast.group_norm),
        F.instance_norm: Rule(reference.instance_norm, fast=fast.instance_norm),
        F.layer_norm: channel_norm,
        F.linear: Rule(reference.channel_linear, fast=fast.channel_linear),
        F.pad: Rule(reference.mask_in, fast=fast.pad_on_canvas),
        F.prelu: Rule(reference.per_channel, fast=fast.prelu),
        F.dropout2d: Rule(reference.per_channel, fast=fast.channel_dropout),
        F.dropout3d: Rule(reference.per_channel, fast=fast.channel_dropout),
    }
    if hasattr(F, "_max_pool2d"):
        rules[F._max_pool2d] = max_pool
    # volumes and clips: the same handlers, with one value per axis
    rules.update({
        F.conv3d: masked_conv,
        F.conv_transpose3d: canvas,
        F.avg_pool3d: Rule(reference.avg_pool, fast=fast.avg_pool),
        F.max_pool3d: max_pool,
        F.max_pool3d_with_indices: max_pool,
        torch.max_pool3d: max_pool,
        F.adaptive_avg_pool3d: adaptive_pool,
        F.adaptive_max_pool3d: adaptive_pool,
    })
    if hasattr(F, "_max_pool3d"):
        rules[F._max_pool3d] = max_pool
    if hasattr(F, "rms_norm"):
        rules[F.rms_norm] = channel_norm
    return rules


# Plain dicts, never written after import (torch.compile traces lookups in a dict keyed by
# functions, but not in a read-only mapping proxy).
RULES: dict[Callable, Rule] = _rules()


# -- lower-level spellings: (args, kwargs) of the aten call -> (F function, args, kwargs) ---------------
def _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *_):
    """``torch.convolution`` / ``torch._convolution``: ``F.conv2d`` / ``F.conv3d`` or their
    transposed forms for 2-D / 3-D kernels; other dimensionalities keep their spelling (and its rule)."""
    conv, conv_transpose = _CONVOLUTIONS.get(weight.dim(), (None, None))
    if conv is None:
        return None
    if transposed:
        return conv_transpose, (input, weight, bias, stride, padding, output_padding, groups, dilation), {}
    return conv, (input, weight, bias, stride, padding, dilation, groups), {}


# by kernel rank: (convolution, transposed convolution)
_CONVOLUTIONS = {4: (F.conv2d, F.conv_transpose2d), 5: (F.conv3d, F.conv_transpose3d)}


def _batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, *_):
    return F.batch_norm, (input, running_mean, running_var, weight, bias, training, momentum, eps), {}


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *_):
    return F.group_norm, (input, num_groups, weight, bias, eps), {}


def _instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, *_):
    return F.instance_norm, (input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps), {}


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *_):
    return F.layer_norm, (input, normalized_shape, weight, bias, eps), {}


SPELLINGS: dict[Callable, Callable] = {
    torch.convolution: _convolution,
    torch._convolution: _convolution,
    torch.batch_norm: _batch_norm,
    torch.group_norm: _group_norm,
    torch.instance_norm: _instance_norm,
    torch.layer_norm: _layer_norm,
}


def resolve(func, args, kwargs) -> tuple[Rule, Callable, tuple, dict] | None:
    """The rule for a call and the call in its ``F.*`` spelling, or None for a function with no
    rule (an op the forms classify by name)."""
    respell = _get(SPELLINGS, func)
    if respell is not None:
        spelled = respell(*args, **kwargs)
        if spelled is not None:
            func, args, kwargs = spelled
    rule = _get(RULES, func)
    return None if rule is None else (rule, func, args, kwargs)


def _get(table: Mapping, func):
    try:
        return table.get(func)
    except TypeError:  # an unhashable callable
        return None
