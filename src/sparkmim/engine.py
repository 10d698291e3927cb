"""Pre-training engine: model and optimiser set-up, schedules, the training loop (no argparse here)."""

from __future__ import annotations

import contextlib
import inspect
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .backbones import create_backbone
from .checkpoint import CheckpointManager, load_encoder_weights
from .config import ConfigError, PretrainConfig
from .data import (
    EpochSampler,
    ImageFiles,
    collate,
    compute_stats,
    default_stats,
    demo_photo_paths,
    list_images,
    pretrain_transform,
)
from .encoder import SparseEncoder
from .masking import MaskPyramid, num_visible, random_visible
from .model import SparK
from .optim import Schedule, clip_grad_norm_, lamb, param_groups
from .visualize import reconstruction_grid, save_grid

__all__ = ["build_model", "build_optimizer", "optimizer_step", "resolve_device", "resolve_precision", "resolve_channels_last", "pretrain",
           "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting good checkpoints."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} requested but CUDA is not available; use --device cpu")
    return dev


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return name


def resolve_channels_last(value: str, device: torch.device) -> bool:
    """A config's ``channels_last`` (``auto``, ``true`` or ``false``) for ``device``. ``auto``:
    channels-last on CUDA (tensor-core convolutions), contiguous on CPU (where a convolution's
    weight gradient is much slower channels-last)."""
    if value == "auto":
        return device.type == "cuda"
    if value not in ("true", "false"):
        raise ConfigError(f"channels_last must be auto, true or false, got {value!r}")
    return value == "true"


def build_model(cfg: PretrainConfig) -> SparK:
    """The backbone by name (random init), optional strict ``--init`` weights, wrapped in SparK."""
    backbone = create_backbone(cfg.model, in_chans=cfg.in_chans, drop_path=cfg.drop_path)
    if cfg.init:
        report = load_encoder_weights(backbone, cfg.init, strict=True)
        print(json.dumps({"event": "init", "weights": cfg.init, "matched_keys": len(report["matched"])}), flush=True)
    encoder = SparseEncoder(backbone, in_chans=cfg.in_chans, sparse_impl=cfg.sparse_impl)
    if cfg.input_size % encoder.patch_size:
        raise ConfigError(f"input_size {cfg.input_size} is not a multiple of {cfg.model}'s total stride "
                          f"{encoder.patch_size}; try {max(2, round(cfg.input_size / encoder.patch_size)) * encoder.patch_size}")
    return SparK(encoder, mask_ratio=cfg.mask_ratio, decoder_width=cfg.decoder_width, densify_norm=cfg.densify_norm,
                 hierarchical=cfg.hierarchical, sparse=cfg.sparse, pos_embed=cfg.pos_embed, loss_on=cfg.loss_on)


class _Metrics:
    """JSON lines in the run directory, and TensorBoard when available."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only", stacklevel=2)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"pretrain/{k}", v, record["step"])

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def build_optimizer(model: SparK, cfg: PretrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    """LAMB over :func:`param_groups` with the config's betas (auto: 0.9, 0.999 for LayerNorm
    models, 0.9, 0.95 for BatchNorm models) and initial weight decay; it does not clip."""
    if cfg.betas == "auto":
        betas = (0.9, 0.999) if model.densify_norm == "ln" else (0.9, 0.95)
    else:
        betas = tuple(float(v) for v in cfg.betas.split(","))
    return lamb(param_groups(model), lr=peak_lr, betas=betas, weight_decay=cfg.weight_decay)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip_grad: float) -> torch.Tensor:
    """One optimiser step on the accumulated gradients: unscale (fp16), clip the global norm once
    at ``clip_grad`` (0: no clip), step, clear the gradients. Returns the global gradient norm
    before clipping, on the device (no host read)."""
    scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _data(cfg: PretrainConfig):
    if cfg.data:
        paths = list_images(cfg.data)
    else:
        photos = demo_photo_paths()
        paths = [photos[i % len(photos)] for i in range(cfg.demo_length)]
    if cfg.norm_stats == "data":
        mean, std = compute_stats(paths, cfg.in_chans)
    else:
        mean, std = default_stats(cfg.in_chans)
    transform = pretrain_transform(cfg.input_size, mean, std, scale=(cfg.crop_scale_min, 1.0))
    fast = (cfg.input_size, cfg.crop_scale_min) if cfg.fast_decode else None
    return ImageFiles(paths, transform, cfg.in_chans, fast_decode=fast), mean, std


def _step_masks(model: SparK, images: torch.Tensor, seed: int, step: int, micro: int, rank: int = 0,
                world: int = 1) -> MaskPyramid:
    """Masks as a pure function of (seed, step, micro-batch): identical after a resume. They are
    drawn for the global batch and each rank takes its rows (rank, rank + world, ...), the
    positions its samples hold in the global batch, so any world size sees the same masks."""
    grid = model.grid(images)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + micro)
    visible = random_visible(images.shape[0] * world, grid, model.mask_ratio, generator=g)[rank::world]
    visible = visible.to(images.device, non_blocking=True)
    return MaskPyramid(visible, keep=num_visible(grid[0] * grid[1], model.mask_ratio))


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pre-training job; returns the final summary."""
    from .distributed import cleanup, init_distributed

    info, device = init_distributed(resolve_device(cfg.device), cfg.dist_timeout)
    try:
        return _pretrain(cfg, info, device)
    finally:
        cleanup()


def _pretrain(cfg: PretrainConfig, info, device: torch.device) -> dict:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .distributed import all_reduce_sum, barrier

    main = info.main
    if cfg.resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        cfg.resume = "auto"  # torchrun restarted the workers after a failure: continue from the last checkpoint
    run_dir = Path(cfg.out)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    torch.manual_seed(cfg.seed)
    dataset, mean, std = _data(cfg)
    sampler = EpochSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=info.rank, world=info.world)
    steps_per_epoch = sampler.batches_per_epoch() // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch of {sampler.batches_per_epoch()} batches is shorter than accum_steps={cfg.accum_steps}")
    model = build_model(cfg).to(device, torch.float64 if precision == "fp64" else None)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.world > 1 and cfg.sync_bn:
        model.set_sync_group(dist.group.WORLD)
    # parameters without a gradient (e.g. a timm head's norm) are left out of training, so DDP
    # need not search the graph for them each step; they are still exported unchanged
    unused = model.unused_parameters()
    for name in unused or ():
        model.get_parameter(name).requires_grad_(False)
    effective_batch = cfg.batch_size * cfg.accum_steps * info.world
    peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * effective_batch / 256
    optimizer = build_optimizer(model, cfg, peak_lr)
    schedule = Schedule(peak_lr, cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                        cfg.warmup_start_ratio, cfg.final_lr_ratio, cfg.weight_decay, cfg.weight_decay_end)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    if cfg.compile:
        # the dense decoder holds most of the arithmetic; the sparse encoder stays eager (its
        # torch-function mode traces with PyTorch 2.14 but not with every older release)
        model.decoder.compile()

    ckpts = CheckpointManager(run_dir, cfg.keep_last)
    start_epoch, start_batch, step, images_seen, bad_total, first_loss = 0, 0, 0, 0, 0, None
    if cfg.resume:
        path = ckpts.latest() if cfg.resume == "auto" else Path(cfg.resume)
        if path is None:
            print(json.dumps({"event": "resume", "note": f"no checkpoint in {run_dir}; starting fresh"}), flush=True)
        else:
            state = ckpts.load(path, cfg)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            images_seen, bad_total, first_loss = state["images_seen"], state["bad_images"], state["first_loss"]
            old_world = state.get("world", 1)
            if old_world != info.world:
                # another world size: keep the images already consumed this epoch (a prefix of the
                # epoch's order) and the images seen, rounded down to whole global batches
                start_batch = start_batch * cfg.batch_size * old_world // (cfg.batch_size * info.world)
                step = images_seen // effective_batch
            if main:
                print(json.dumps({"event": "resume", "checkpoint": str(path), "epoch": start_epoch, "step": step,
                                  "world": info.world, "checkpoint_world": old_world}), flush=True)
    if main:
        (run_dir / "config.yaml").write_text(_yaml(cfg))
    ddp = model
    if info.world > 1:
        # buffers: with sparse SyncBatchNorm every rank computes the same running statistics, so
        # copying rank 0's before each forward is wasted work (the keyword was renamed in torch 2.12)
        sync_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused is None, **{sync_buffers: not cfg.sync_bn})

    loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                                         drop_last=True, **loader_kw)
    metrics = _Metrics(run_dir, cfg.tensorboard) if main else None
    # eight images spread over the (sorted) data set, so a class-per-folder tree shows several classes
    shown = sorted({i * len(dataset) // min(8, len(dataset)) for i in range(min(8, len(dataset)))})
    vis_images = torch.stack([dataset[(cfg.seed, -1, i)][0] for i in shown]) if main else None

    def visualise(tag: str):
        if not main:
            return
        model.eval()
        g = torch.Generator().manual_seed(cfg.seed)
        rec = model.reconstruct(vis_images.to(device, next(model.parameters()).dtype), visible=random_visible(
            vis_images.shape[0], model.grid(vis_images), model.mask_ratio, generator=g).to(device))
        model.train()
        grid = reconstruction_grid(rec, mean, std)
        save_grid(grid, run_dir / "reconstructions" / f"{tag}.png")
        metrics.image("reconstruction", grid, step)

    total_steps = cfg.epochs * steps_per_epoch
    started = time.perf_counter()
    if main:
        print(json.dumps({"event": "start", "model": cfg.model, "images": len(dataset), "steps_per_epoch": steps_per_epoch,
                          "total_steps": total_steps, "effective_batch": effective_batch, "peak_lr": peak_lr,
                          "device": str(device), "precision": precision, "channels_last": channels_last, "strides": model.encoder.strides,
                          "world": info.world, "sync_bn": info.world > 1 and cfg.sync_bn,
                          "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                          "run_dir": str(run_dir)}), flush=True)
    if step == 0:
        visualise("epoch0000_start")

    def global_bad() -> int:
        return bad_base + int(all_reduce_sum(torch.tensor(float(bad_local), device=device)))

    def save(epoch: int, batch: int):
        bad = global_bad()
        if main:
            ckpts.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch, "batch": batch, "step": step, "images_seen": images_seen,
                        "bad_images": bad, "first_loss": first_loss, "config": cfg.to_dict(),
                        "norm_mean": list(mean), "norm_std": list(std), "world": info.world}, step)
        barrier()  # no rank runs ahead of a checkpoint being written

    progress = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    bad_base, bad_local = bad_total, 0
    t0, last_loss, window_images = time.perf_counter(), float("nan"), 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_count = 0
    # global gradient norms before clipping, summed over the window's optimiser steps (fp16 steps
    # whose gradients overflowed are skipped by the scaler and left out here too)
    norm_sum = torch.zeros((), device=device, dtype=torch.float64)
    norm_count = torch.zeros((), device=device, dtype=torch.float64)

    def check_finite(where: str):
        if bool(all_reduce_sum(nonfinite.float())):
            raise NonFiniteLossError(
                f"the loss became NaN or infinite before {where} (step {step}); the run stopped and the last good "
                f"checkpoint in {run_dir} was kept. Lower the learning rate, use bf16 instead of fp16, or check the data.")

    try:
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, skip)
            micro = 0
            for batch_idx, (images, bad) in enumerate(loader, start=skip):
                bad_local += bad
                images = images.to(device, torch.float64 if precision == "fp64" else None, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if micro == 0:
                    for g in optimizer.param_groups:
                        g["lr"] = schedule.lr(step)
                        if g.get("decay"):
                            g["weight_decay"] = schedule.weight_decay(step)
                torch.manual_seed(cfg.seed * 7919 + step * 13 + micro)  # stochastic depth etc.
                masks = _step_masks(model, images, cfg.seed, step, micro, info.rank, info.world)
                accumulating = info.world > 1 and micro + 1 < cfg.accum_steps
                with ddp.no_sync() if accumulating else contextlib.nullcontext():
                    with autocast():
                        out = ddp(images, masks)
                    loss = out.loss.float()
                    scaler.scale(loss / cfg.accum_steps).backward()
                nonfinite |= ~torch.isfinite(loss.detach())
                loss_sum += loss.detach()
                loss_count += 1
                window_images += images.shape[0]
                micro += 1
                if micro < cfg.accum_steps:
                    continue
                micro = 0
                grad_norm = optimizer_step(model, optimizer, scaler, cfg.clip_grad)
                finite_norm = torch.isfinite(grad_norm)
                norm_sum += torch.where(finite_norm, grad_norm, 0.0)
                norm_count += finite_norm
                step += 1
                images_seen += effective_batch
                if first_loss is None and step == 1:
                    # the first optimiser step's loss (all micro-batches, all ranks); one host read per run
                    first = all_reduce_sum(torch.stack([loss_sum.float(), loss_sum.new_tensor(float(loss_count))]))
                    first_loss = float(first[0] / first[1])
                if step % cfg.log_every_steps == 0 or step == total_steps:
                    check_finite("logging")
                    totals = all_reduce_sum(torch.stack([loss_sum.float(), loss_sum.new_tensor(float(loss_count))]))
                    last_loss = float(totals[0] / totals[1])
                    bad_total = global_bad()
                    elapsed = time.perf_counter() - t0
                    norm_steps = float(norm_count)
                    record = {"step": step, "epoch": epoch, "loss": last_loss,
                              "grad_norm": float(norm_sum) / norm_steps if norm_steps else None,
                              "lr": schedule.lr(step - 1), "weight_decay": schedule.weight_decay(step - 1),
                              "img_per_s": window_images * info.world / max(elapsed, 1e-9), "bad_images": bad_total,
                              "images_seen": images_seen}
                    if metrics is not None:
                        metrics.log(record)
                    if progress is not None:
                        grad = "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
                        progress.set_postfix(loss=f"{last_loss:.4f}", grad_norm=grad, lr=f"{record['lr']:.2e}",
                                             img_s=f"{record['img_per_s']:.1f}", refresh=False)
                    loss_sum.zero_()
                    norm_sum.zero_()
                    norm_count.zero_()
                    loss_count, window_images, t0 = 0, 0, time.perf_counter()
                    read = images_seen + bad_total
                    if read >= min(64, len(dataset)) and bad_total > cfg.max_bad_fraction * read:
                        raise RuntimeError(f"{bad_total} of {read} images read so far were unreadable "
                                           f"(more than {cfg.max_bad_fraction:.0%}); check the data folder")
                if progress is not None:
                    progress.update(1)
                if cfg.save_every_steps and step % cfg.save_every_steps == 0 and batch_idx + 1 < sampler.batches_per_epoch():
                    check_finite("a checkpoint")
                    save(epoch, batch_idx + 1)
            if (epoch + 1) % cfg.save_every_epochs == 0 or epoch + 1 == cfg.epochs:
                check_finite("a checkpoint")
                save(epoch + 1, 0)
            if (epoch + 1) % cfg.vis_every_epochs == 0 or epoch + 1 == cfg.epochs:
                visualise(f"epoch{epoch + 1:04d}")
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()

    from .checkpoint import save_encoder_weights

    weights = run_dir / "encoder.safetensors"
    if main:
        save_encoder_weights(model.encoder, weights)
    barrier()
    summary = {"event": "done", "epochs": cfg.epochs, "steps": step, "images_seen": images_seen,
               "bad_images": bad_total, "loss_first": first_loss, "loss_last": last_loss,
               "seconds": round(time.perf_counter() - started, 1), "encoder_weights": str(weights), "run_dir": str(run_dir)}
    return summary


def _yaml(cfg: PretrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
