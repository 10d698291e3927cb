import copy
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparkmim.backbones import TESTED_TIMM as TIMM_ZOO
from sparkmim.backbones import TESTED_TIMM_SLOW as TIMM_ZOO_SLOW
from sparkmim.backbones import TESTED_TORCHVISION as TORCHVISION_ZOO
from sparkmim.backbones import TESTED_TORCHVISION_SLOW as TORCHVISION_SLOW

P = 32  # total stride of every zoo model
__all__ = ["P", "TIMM_ZOO", "TIMM_ZOO_SLOW", "TORCHVISION_ZOO", "TORCHVISION_SLOW", "write_noise_images", "fresh", "buffers",
           "projected_run", "loss_and_gradients"]


def write_noise_images(root: Path, count: int, size: tuple[int, int], seed: int, suffix: str = ".png") -> Path:
    """``count`` random RGB images of ``size`` (h, w) in ``root``, named 00, 01, ..."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{i:02d}{suffix}")
    return root


def fresh(enc):
    """An independent copy (weights, buffers and hooks) of an encoder; the global RNG is reset so
    stochastic layers (stochastic depth in torchvision models) draw the same numbers each run."""
    torch.manual_seed(1234)
    return copy.deepcopy(enc)


def buffers(enc):
    return {k: v.clone() for k, v in enc.model.named_buffers()}


def projected_run(enc, x, masks=None, train=True, impl=None):
    """A fresh copy of ``enc`` run densely (``masks`` None) or sparsely (in the sparse form
    ``impl``, default the encoder's): its features, the gradients of a fixed random projection of
    them, and its buffers afterwards."""
    e = fresh(enc).train(train)
    with e.using(impl or e.sparse_impl):
        feats = e(x) if masks is None else e(x, masks)
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i), dtype=f.dtype)
               for i, f in enumerate(feats)]
    sum((f * w).sum() for f, w in zip(feats, weights)).backward()
    grads = {k: p.grad.clone() for k, p in e.model.named_parameters() if p.grad is not None}
    return feats, grads, buffers(e)


def _holds_tiles(out) -> bool:
    from sparkmim.sparse import SparseMap

    if isinstance(out, (list, tuple)):
        return any(isinstance(t, SparseMap) for t in out)
    return isinstance(out, SparseMap)


def run_in_form(enc, impl, x, masks, train=True):
    """A fresh copy of ``enc`` in sparse form ``impl``: its features, the loss of a fixed random
    projection of them, that loss's gradients, its buffers afterwards, and whether the first
    feature map was held as visible tiles."""
    e = fresh(enc).train(train)
    held = []
    hook = e.model.get_submodule(e.features[0].module).register_forward_hook(
        lambda m, a, o: held.append(_holds_tiles(o)))
    with e.using(impl):
        feats = e(x, masks)
    hook.remove()
    weights = [torch.randn(f.shape, generator=torch.Generator().manual_seed(i), dtype=f.dtype)
               for i, f in enumerate(feats)]
    loss = sum((f * w).sum() for f, w in zip(feats, weights))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in e.model.named_parameters() if p.grad is not None}
    return feats, loss.detach(), grads, buffers(e), bool(held) and all(held)


def assert_fast_form_stays_on_the_meta_device(enc, x, visible, name):
    """Forward and backward of the fast form with ``x`` and the masks on the ``meta`` device: a
    tensor made on the CPU, or a value read by the host, fails there as it would on a GPU."""
    from sparkmim import MaskPyramid

    e = fresh(enc).to("meta").train()
    assert e.sparse_impl == "fast"
    held = []
    hook = e.model.get_submodule(e.features[0].module).register_forward_hook(
        lambda m, a, o: held.append(_holds_tiles(o)))
    feats = e(x.to("meta"), MaskPyramid(visible.to("meta"), keep=int(visible[0].sum())))
    hook.remove()
    assert held == [True], f"{name}: the fast form did not run on the meta device"
    assert [f.device.type for f in feats] == ["meta"] * len(feats)
    sum(f.sum() for f in feats).backward()
    grads = [p.grad for p in e.model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "meta" for g in grads)


def loss_and_gradients(model, loss_fn):
    """``loss_fn()`` and the gradients it gives every parameter of ``model`` (zeroed first)."""
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- the whole_run marker ---------------------------------------------------------------------------
# A test runs a whole pre-training run when its body, a fixture it requests or a helper of its
# module starts one: sparkmim.pretrain(...), Run(...), or a call or list whose first item is the
# command "pretrain" or "demo" (main([...]), a subprocess; one refused before its first step counts too).
_STARTS_A_RUN = re.compile(r"\bpretrain\(|[\[(]\s*[\"'](pretrain|demo)[\"']|\bRun\(")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _runners(module) -> set[str]:
    """Names of the module's own functions (helpers and fixtures) that start a run, directly or
    through another such function of the module."""
    funcs = {name: _source(f) for name, f in vars(module).items()
             if inspect.isfunction(f) and getattr(f, "__module__", None) == module.__name__}
    found = {name for name, src in funcs.items() if _STARTS_A_RUN.search(src)}
    while True:
        more = {name for name, src in funcs.items() if name not in found
                and any(re.search(rf"\b{re.escape(r)}\b", src) for r in found)}
        if not more:
            return found
        found |= more


def starts_a_run(item) -> bool:
    """Whether a collected test runs a whole pre-training run (see _STARTS_A_RUN)."""
    module = getattr(item, "module", None)
    func = getattr(item, "function", None)
    if module is None or func is None:
        return False
    runners = _runners(module)
    src = _source(func)
    return bool(_STARTS_A_RUN.search(src)) or any(re.search(rf"\b{re.escape(r)}\b", src) for r in runners) \
        or any(name in runners for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if starts_a_run(item):
            item.add_marker(pytest.mark.whole_run)
