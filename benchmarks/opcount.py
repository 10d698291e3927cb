"""Count the aten operations one pre-training step dispatches (device-independent); JSON lines.

    python benchmarks/opcount.py --models resnet50,convnext_small

Each count is taken with a ``TorchDispatchMode`` that records every aten call (forward and
backward), so it measures Python/dispatcher work per step the same way on any machine:

* ``step``: a step of the run loop itself: :class:`sparkmim.train.run.Run` on a tiny synthetic
  folder (``--size`` px, ``--batch`` images per step), counted around the engine's
  :func:`~sparkmim.train.loop.train_step` over steps 3 to 6 (mask drawing, forward, backward,
  the one clip and the optimiser step), averaged; reading and augmenting the images is counted
  apart (``loading``: a run with ``--workers`` > 0 does it in worker processes);
* ``model``: forward and backward of the SparK model (encoder, densify, decoder, loss);
* ``encoder``: forward and backward of the sparse encoder alone (sum of its features);
* ``dense``: the same for the plain dense backbone (``forward_intermediates``), for reference;
* ``optimizer``: the one gradient clip and the optimiser step.

``ops_per_step_cuda_choices`` is the step again with the layer kernels a CUDA device picks and its
optimiser hyper-parameters held on the device (the devices put depthwise convolutions on the
canvas below different tile sizes, and only the CPU runs one-site convolutions as im2col
products: ``CANVAS_DEPTHWISE_BELOW`` and ``IM2COL_ONE_SITE`` in :mod:`sparkmim.sparse.fast`).

Options: ``--sparse-impl fast|reference``; ``--ops`` prints the 25 most frequent operations.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.on = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _folder(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def count_run_steps(model: str, size: int, batch: int, impl: str, first: int = 3, last: int = 6) -> Count:
    """Ops of the run loop's steps ``first``..``last`` (1-based), through the engine's own step."""
    import sparkmim.train.run as run_module
    from sparkmim.config import load_config
    from sparkmim.distributed import DistInfo

    counter, loading = Count(), Count()
    real_step, real_micro_batches = run_module.train_step, run_module.Run._micro_batches
    seen = {"step": 0}

    class Paused:
        """The loader's batches, fetched with the step's counter paused (a run with --workers > 0
        reads and augments images in worker processes, not in the training process)."""

        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return self

        def __next__(self):
            counter.on, loading.on = False, counter.on
            try:
                with loading:
                    return next(self.batches)
            finally:
                counter.on, loading.on = loading.on, False

    def counted_step(*args, **kwargs):
        seen["step"] += 1
        if not first <= seen["step"] <= last:
            return real_step(*args, **kwargs)
        with counter:
            return real_step(*args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _folder(data, batch * (last + 1), size)
        cfg = load_config(None, dict(data=str(data), out=str(Path(tmp) / "run"), model=model, input_size=size,
                                     batch_size=batch, workers=0, epochs=1, sparse_impl=impl, tensorboard=False,
                                     progress=False, vis_every_epochs=0, save_every_epochs=0, log_every_steps=1000,
                                     device="cpu", crop_scale_min=1.0))
        run_module.train_step = counted_step
        run_module.Run._micro_batches = lambda self, batches: real_micro_batches(self, Paused(batches))
        try:
            run = run_module.Run(cfg, DistInfo(), torch.device("cpu"))
            run.train()
        finally:
            run_module.train_step, run_module.Run._micro_batches = real_step, real_micro_batches
    counter.steps = loading.steps = last - first + 1
    return counter, loading


def count_parts(model: str, size: int, batch: int, impl: str) -> dict[str, Count]:
    """Ops of the model's parts, on the same model the run builds."""
    from sparkmim.config import load_config
    from sparkmim.modality import modality_for
    from sparkmim.train.loop import optimizer_step
    from sparkmim.train.setup import build_model, build_optimizer

    cfg = load_config(None, dict(data="demo", model=model, input_size=size, batch_size=batch, sparse_impl=impl))
    torch.manual_seed(0)
    spark = build_model(cfg, modality_for(cfg.model)).train()
    opt = build_optimizer(spark, cfg, 1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.randn(batch, 3, size, size)
    masks = spark.draw_masks(x, torch.Generator().manual_seed(0))
    counts = {}

    def measure(name, fn):
        fn()  # warm caches (lazy initialisation, first-call paths)
        spark.zero_grad(set_to_none=True)  # as after an optimiser step
        c = Count()
        with c:
            fn()
        counts[name] = c

    def model_fb():
        spark(x, masks).loss.backward()

    def encoder_fb():
        sum(f.float().sum() for f in spark.encoder(x, masks) if f is not None).backward()

    backbone = spark.encoder.model

    def dense_fb():
        feats = backbone.forward_intermediates(x, intermediates_only=True)
        sum(f.sum() for f in feats).backward()

    def opt_step():
        spark(x, masks).loss.backward()
        c = Count()
        with c:
            optimizer_step(spark, opt, scaler, cfg.clip_grad)
        counts["optimizer"] = c

    measure("model", model_fb)
    measure("encoder", encoder_fb)
    if hasattr(backbone, "forward_intermediates"):
        measure("dense", dense_fb)
    spark.zero_grad(set_to_none=True)
    opt_step()
    opt_step()
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,convnext_small")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sparse-impl", default="fast", choices=["fast", "reference"])
    p.add_argument("--ops", action="store_true", help="also print the most frequent operations per part")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import sparkmim.sparse.fast as fast

    for model in args.models.split(","):
        step, loading = count_run_steps(model, args.size, args.batch, args.sparse_impl)
        parts = count_parts(model, args.size, args.batch, args.sparse_impl)
        # the same step with the kernel choices of a CUDA device
        choices = getattr(fast, "CANVAS_DEPTHWISE_BELOW", None)
        if choices is None:  # code without device-dependent kernel choices
            cuda_step = step
        else:
            import sparkmim.train.run as run_module
            from sparkmim.optim import hold_on_device

            cpu_choices, im2col, build = dict(choices), fast.IM2COL_ONE_SITE, run_module.build_optimizer
            choices.clear()
            if "cuda" in cpu_choices:  # the CUDA device's canvas sizes, asked for by the CPU tensors
                choices["cpu"] = cpu_choices["cuda"]
            fast.IM2COL_ONE_SITE = frozenset()
            # and lr / weight decay held on the device, as build_optimizer does off the CPU
            def held(*a, build=build):
                opt = build(*a)
                hold_on_device(opt)
                return opt

            run_module.build_optimizer = held
            try:
                cuda_step = count_run_steps(model, args.size, args.batch, args.sparse_impl)[0]
            finally:
                choices.update(cpu_choices)
                fast.IM2COL_ONE_SITE, run_module.build_optimizer = im2col, build
        rec = {"model": model, "impl": args.sparse_impl, "size": args.size, "batch": args.batch,
               "ops_per_step": round(step.total / step.steps),
               "ops_per_step_cuda_choices": round(cuda_step.total / cuda_step.steps),
               "ops_loading_per_step": round(loading.total / loading.steps),
               **{f"ops_{k}": c.total for k, c in parts.items()}}
        if args.ops:
            rec["top_step"] = dict(collections.Counter({k: v // step.steps for k, v in step.ops.items()}).most_common(25))
            rec["top_encoder"] = dict(parts["encoder"].ops.most_common(25))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())
