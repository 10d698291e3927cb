"""The one registry of layers (sparkmim.sparse.table) and the shared op vocabulary (sparse.ops)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sparkmim.sparse import algebra, fast, ops, reference, table
from sparkmim.sparse.ops import KIND_OF, PASS_THROUGH, REARRANGING, OpKind
from sparkmim.sparse.table import RULES, SPELLINGS, resolve

# Layers whose fast form is, on purpose, the reference handler on the zero canvas (rare layers,
# where a row kernel would not pay). A layer added to the registry with a reference handler only
# must be added here too, so that the choice is made knowingly.
CANVAS_FALLBACKS = {F.conv_transpose2d, F.conv_transpose3d, F.interpolate, F.upsample,
                    torch.convolution, torch._convolution}  # the last two: convolutions that are not 2-D or 3-D


def test_every_rule_has_a_reference_handler_and_exactly_the_listed_ones_fall_back_to_the_canvas():
    for func, rule in RULES.items():
        assert callable(rule.reference) and rule.reference.__module__ == reference.__name__, func
        assert rule.fast is None or (callable(rule.fast) and rule.fast.__module__ == fast.__name__), func
    assert {func for func, rule in RULES.items() if rule.fast is None} == CANVAS_FALLBACKS
    assert RULES[F.max_pool2d].fill == float("-inf")  # ignored sites of a max pool read as -inf on the canvas


def test_rule_requires_both_forms_to_be_named():
    with pytest.raises(TypeError):
        table.Rule(reference.mask_in_out)  # fast=None must be written out


def test_every_op_kind_has_a_meaning_in_both_forms():
    assert PASS_THROUGH.isdisjoint(REARRANGING)
    assert PASS_THROUGH | REARRANGING | {OpKind.REDUCTION} == set(OpKind)  # reference form
    assert set(algebra.ON_TILES) == set(OpKind)  # fast form


def test_the_vocabulary_names_each_op_once_and_apart_from_the_registry():
    listed = [n for names in ops._NAMES.values() for n in names.split()]
    assert len(listed) == len(set(listed)) == len(KIND_OF)
    assert ops.MASKED_REDUCTIONS <= {n for n, k in KIND_OF.items() if k is OpKind.REDUCTION}
    assert ops.SCANS <= ops.ONE_DIM_REDUCTIONS <= set(KIND_OF)
    registered = {getattr(f, "__name__", None) for f in (*RULES, *SPELLINGS)}
    assert registered.isdisjoint(KIND_OF), registered & set(KIND_OF)


def _aten_calls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    stats = lambda: (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))  # noqa: E731
    yield "convolution", torch.convolution, (x, w, b, [2, 2], [1, 1], [1, 1], False, [0, 0], 1), F.conv2d
    yield "transposed", torch.convolution, (x, w, b, [2, 2], [1, 1], [1, 1], True, [1, 1], 1), F.conv_transpose2d
    v = torch.randn(2, 4, 4, 6, 8, generator=g, dtype=torch.float64)
    w3 = torch.randn(4, 4, 3, 3, 3, generator=g, dtype=torch.float64)
    yield "convolution3d", torch.convolution, (v, w3, b, [1, 2, 2], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1), F.conv3d
    yield "transposed3d", torch.convolution, (v, w3, b, [2, 2, 2], [1, 1, 1], [1, 1, 1], True, [1, 1, 1], 1), \
        F.conv_transpose3d
    yield "_convolution", torch._convolution, (x, w, None, [1, 1], [2, 2], [2, 2], False, [0, 0], 1, False, False,
                                                False, False), F.conv2d
    yield "batch_norm", torch.batch_norm, (x, b, b, *stats(), True, 0.1, 1e-5, False), F.batch_norm
    yield "group_norm", torch.group_norm, (x, 2, b, b, 1e-5, False), F.group_norm
    yield "instance_norm", torch.instance_norm, (x, b, b, None, None, True, 0.1, 1e-5, False), F.instance_norm
    yield "layer_norm", torch.layer_norm, (x, [6], None, None, 1e-5, False), F.layer_norm


@pytest.mark.parametrize("name,func,args,target", list(_aten_calls()), ids=[c[0] for c in _aten_calls()])
def test_lower_level_spellings_become_the_functional_call_with_the_same_result(name, func, args, target):
    rule, spelled, new_args, new_kwargs = resolve(func, args, {})
    assert spelled is target and rule is RULES[target]
    fresh = copy.deepcopy(args)
    torch.testing.assert_close(spelled(*new_args, **new_kwargs), func(*fresh), rtol=0, atol=0)
    if name == "batch_norm":  # the running statistics are the same tensors, updated the same way
        torch.testing.assert_close((new_args[1], new_args[2]), (fresh[3], fresh[4]), rtol=0, atol=0)


def test_a_convolution_that_is_not_2d_or_3d_keeps_its_spelling_and_rule():
    x, w = torch.randn(2, 3, 8), torch.randn(4, 3, 3)
    args = (x, w, None, [1], [1], [1], False, [0], 1)
    rule, func, new_args, _ = resolve(torch.convolution, args, {})
    assert func is torch.convolution and new_args is args and rule.fast is None


def test_functions_without_a_rule_resolve_to_none():
    assert resolve(torch.add, (torch.ones(1), 1), {}) is None
    assert resolve([].append, (), {}) is None is resolve(lambda: 0, (), {})


def test_the_tables_are_not_written_by_a_forward():
    from sparkmim import MaskPyramid, SparseEncoder

    before = (dict(RULES), dict(SPELLINGS), dict(KIND_OF), dict(algebra.ON_TILES))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3, 2, 1))
    for impl in ("fast", "reference"):
        enc = SparseEncoder(model, ["1", "2"], probe_size=16, sparse_impl=impl)
        v = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
        v[:, :, 0, 1] = True
        enc(torch.randn(2, 3, 8, 8), MaskPyramid(v, keep=1))
    assert (dict(RULES), dict(SPELLINGS), dict(KIND_OF), dict(algebra.ON_TILES)) == before


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=2, stride=2, ceil_mode=True,
                                                             count_include_pad=False),
                                    dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=3, stride=2, padding=1,
                                                                                  count_include_pad=False)])
def test_average_pooling_is_the_same_in_both_forms(kwargs):
    """Windows that tile the patches run on the tiles, others on the canvas: both equal the
    reference form (float64, train mode), values and gradients."""
    from sparkmim import MaskPyramid, random_visible
    from sparkmim.sparse import sparse_form

    v = random_visible(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(0))
    masks = MaskPyramid(v, keep=int(v[0].sum()))
    results = []
    for impl in ("reference", "fast"):
        x = torch.randn(2, 3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with sparse_form(impl, masks) as form:
            y = F.avg_pool2d(form.enter(x), **kwargs)
            out = form.exit(y, 4 // (kwargs.get("stride") or kwargs["kernel_size"]))
        (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append((out.detach(), x.grad))
    assert results[0][0].abs().sum() > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)
