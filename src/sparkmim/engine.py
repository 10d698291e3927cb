"""Pre-training engine: model and optimiser set-up, schedules, the training loop (no argparse here)."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .backbones import create_backbone
from .checkpoint import (
    CheckpointManager,
    atomic_write,
    load_encoder_weights,
    save_encoder_weights,
    state_bytes,
)
from .config import ConfigError, PretrainConfig
from .data import (
    BadFiles,
    DataError,
    EpochSampler,
    ImageFiles,
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
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from e
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

    @staticmethod
    def truncate(run_dir: Path, step: int) -> None:
        """Drop the lines of steps after ``step`` (logged before a crash, and logged again after
        the resume from ``step``), so every step appears once."""
        path = run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        def kept(line: str) -> bool:
            try:
                return json.loads(line).get("step", 0) <= step
            except ValueError:  # a line cut short by the crash
                return False

        keep = [line for line in path.read_text().splitlines(keepends=True) if kept(line)]
        atomic_write(path, lambda tmp: tmp.write_text("".join(keep)))

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
    """The data set, its normalisation statistics, and the listed files that do not exist
    (``{path: reason}``; a file list may name files that are gone)."""
    missing: dict[str, str] = {}
    if cfg.data:
        paths = list_images(cfg.data)
        if Path(cfg.data).is_file():
            missing = {str(p): "FileNotFoundError: no such file" for p in paths if not p.is_file()}
            paths = [p for p in paths if str(p) not in missing]
            if not paths:
                raise DataError(f"none of the {len(missing)} files listed in {cfg.data} exist "
                                f"(first: {next(iter(missing))})")
            if len(missing) > cfg.max_bad_fraction * (len(paths) + len(missing)):
                raise DataError(f"{len(missing)} of the {len(paths) + len(missing)} files listed in {cfg.data} do not "
                                f"exist (more than --max-bad-fraction {cfg.max_bad_fraction:g}; first: "
                                f"{next(iter(missing))})")
    else:
        photos = demo_photo_paths()
        paths = [photos[i % len(photos)] for i in range(cfg.demo_length)]
    if cfg.norm_stats == "data":
        mean, std = compute_stats(paths, cfg.in_chans)
    else:
        mean, std = default_stats(cfg.in_chans)
    transform = pretrain_transform(cfg.input_size, mean, std, scale=(cfg.crop_scale_min, 1.0))
    fast = (cfg.input_size, cfg.crop_scale_min) if cfg.fast_decode else None
    return ImageFiles(paths, transform, cfg.in_chans, fast_decode=fast), mean, std, missing


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

    from .distributed import all_gather_objects, all_reduce_sum, barrier, broadcast_object

    main = info.main
    if cfg.resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        cfg.resume = "auto"  # torchrun restarted the workers after a failure: continue from the last checkpoint
    run_dir = Path(cfg.out)
    problem = broadcast_object(_claim_run_dir(run_dir, cfg) if main else None)  # every rank fails alike
    if problem:
        raise ConfigError(problem)
    barrier()
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last, device)
    torch.manual_seed(cfg.seed)
    dataset, mean, std, missing = _data(cfg)
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
    start_epoch, start_batch, step, images_seen, first_loss, last_loss = 0, 0, 0, 0, None, None
    bad_files = BadFiles(missing)
    if cfg.resume:
        found = _resume_checkpoint(cfg, ckpts, main)
        if found is not None:
            path, state = found
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
            images_seen, first_loss, last_loss = state["images_seen"], state["first_loss"], state.get("loss_last")
            bad_files = BadFiles({**missing, **state.get("bad_files", {})})
            old_world = state.get("world", 1)
            if old_world != info.world:
                # another world size: keep the images already consumed this epoch (a prefix of the
                # epoch's order) and the images seen, rounded down to whole global batches
                start_batch = start_batch * cfg.batch_size * old_world // (cfg.batch_size * info.world)
                step = images_seen // effective_batch
            if main:
                print(json.dumps({"event": "resume", "checkpoint": str(path), "epoch": start_epoch, "step": step,
                                  "world": info.world, "checkpoint_world": old_world}), flush=True)
                _Metrics.truncate(run_dir, step)  # lines logged after the checkpoint are logged again
            if start_epoch >= cfg.epochs:
                if main:
                    print(json.dumps({"event": "resume", "note": f"the run in {run_dir} had already finished "
                                      f"({start_epoch} of {cfg.epochs} epochs, step {step}); nothing to do"}), flush=True)
                return _summary(cfg, step, images_seen, len(bad_files), first_loss, last_loss, 0.0, run_dir)
    if main:
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(_yaml(cfg)))
        if bad_files.files:  # the list as of the checkpoint (a resume finds later ones again)
            atomic_write(run_dir / "bad_images.txt", lambda tmp: BadFiles.write(tmp, bad_files.files.items()))
        else:
            (run_dir / "bad_images.txt").unlink(missing_ok=True)
        _check_free_space(run_dir, model, cfg.keep_last)
    ddp = model
    if info.world > 1:
        # buffers: with sparse SyncBatchNorm every rank computes the same running statistics, so
        # copying rank 0's before each forward is wasted work (the keyword was renamed in torch 2.12)
        sync_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=unused is None, **{sync_buffers: not cfg.sync_bn})

    loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0, pin_memory=device.type == "cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=dataset.collate, drop_last=True, **loader_kw)
    metrics = _Metrics(run_dir, cfg.tensorboard) if main else None
    vis_images = _display_images(dataset, cfg.seed, bad_files) if main else None

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
    if main and schedule.warmup_steps >= total_steps > 0:
        warnings.warn(f"the warm-up ({schedule.warmup_steps} steps, {cfg.warmup_epochs:g} epochs) is not shorter than "
                      f"the run ({total_steps} steps): the lr never reaches its peak {peak_lr:.3g}; lower "
                      f"--warmup-epochs", stacklevel=2)
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

    def sync_bad_files() -> None:
        """Unreadable files found by any rank since the last call: recorded on every rank, announced
        (one line each) and appended to bad_images.txt by rank 0; then the --max-bad-fraction rule."""
        pending, bad_files.pending = bad_files.pending, []
        if info.world > 1 and int(all_reduce_sum(torch.tensor(float(len(pending)), device=device))) > 0:
            pending = [p for part in all_gather_objects(pending) for p in part]
        new = bad_files.merge(pending)
        if main and new:
            for path, reason in new:
                warnings.warn(f"skipping unreadable image {path} ({reason}); listed in {run_dir / 'bad_images.txt'}",
                              stacklevel=2)
            BadFiles.write(run_dir / "bad_images.txt", new)
        read = min(len(dataset), images_seen) + len(missing)
        if read >= min(64, len(dataset) + len(missing)) and len(bad_files) > cfg.max_bad_fraction * read:
            raise DataError(f"{len(bad_files)} of the {read} image files read so far are unreadable (more than "
                            f"--max-bad-fraction {cfg.max_bad_fraction:g}); they are listed in "
                            f"{run_dir / 'bad_images.txt'}: fix or remove them, or raise --max-bad-fraction")

    def save(epoch: int, batch: int):
        sync_bad_files()
        if main:
            ckpts.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch, "batch": batch, "step": step, "images_seen": images_seen,
                        "bad_images": len(bad_files), "bad_files": dict(bad_files.files), "first_loss": first_loss,
                        "loss_last": last_loss, "config": cfg.to_dict(), "norm_mean": list(mean),
                        "norm_std": list(std), "world": info.world}, step)
        barrier()  # no rank runs ahead of a checkpoint being written

    progress = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    model.train()
    t0, window_images = time.perf_counter(), 0
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
                bad_files.add(bad)
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
                    sync_bad_files()
                    elapsed = time.perf_counter() - t0
                    norm_steps = float(norm_count)
                    record = {"step": step, "epoch": epoch, "loss": last_loss,
                              "grad_norm": float(norm_sum) / norm_steps if norm_steps else None,
                              "lr": schedule.lr(step - 1), "weight_decay": schedule.weight_decay(step - 1),
                              "img_per_s": window_images * info.world / max(elapsed, 1e-9), "bad_images": len(bad_files),
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
                if progress is not None:
                    progress.update(1)
                if _every(cfg.save_every_steps, step) and batch_idx + 1 < sampler.batches_per_epoch():
                    check_finite("a checkpoint")
                    save(epoch, batch_idx + 1)
            if _every(cfg.save_every_epochs, epoch + 1) or epoch + 1 == cfg.epochs:
                check_finite("a checkpoint")
                save(epoch + 1, 0)
            if _every(cfg.vis_every_epochs, epoch + 1) or epoch + 1 == cfg.epochs:
                visualise(f"epoch{epoch + 1:04d}")
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()

    if main:
        save_encoder_weights(model.encoder, run_dir / "encoder.safetensors")
    barrier()
    return _summary(cfg, step, images_seen, len(bad_files), first_loss, last_loss, time.perf_counter() - started,
                    run_dir)


def _summary(cfg: PretrainConfig, step: int, images_seen: int, bad_images: int, first_loss, last_loss,
             seconds: float, run_dir: Path) -> dict:
    """The run's last line; valid JSON (a loss never logged is null)."""
    def finite(v):
        return v if v is not None and math.isfinite(v) else None

    return {"event": "done", "epochs": cfg.epochs, "steps": step, "images_seen": images_seen,
            "bad_images": bad_images, "loss_first": finite(first_loss), "loss_last": finite(last_loss),
            "seconds": round(seconds, 1), "encoder_weights": str(run_dir / "encoder.safetensors"),
            "run_dir": str(run_dir)}


RUN_FILES = ("config.yaml", "metrics.jsonl", "encoder.safetensors", "bad_images.txt", CheckpointManager.PATTERN)


def _claim_run_dir(run_dir: Path, cfg: PretrainConfig) -> str | None:
    """Make ``run_dir`` this run's own folder; the reason it cannot be, or None.

    A folder holding another run's files is refused unless the run continues it (``--resume``
    auto, or a checkpoint inside it) or ``--overwrite`` moves the old run aside, to
    ``OUT.old-<time>``. A folder holding only the files of a run that never wrote a checkpoint
    is moved aside the same way when ``--resume auto`` starts afresh."""
    held = sorted(p.name for pattern in RUN_FILES for p in run_dir.glob(pattern)) if run_dir.is_dir() else []
    resume_inside = cfg.resume not in (None, "auto") and Path(cfg.resume).resolve().parent == run_dir.resolve()
    checkpoints = CheckpointManager(run_dir).paths() if held else []
    continuing = resume_inside or (cfg.resume == "auto" and checkpoints)
    if held and not continuing:
        never_saved = cfg.resume == "auto"  # --resume auto, but the run there wrote no checkpoint
        if not (cfg.overwrite or never_saved):
            listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            return (f"{run_dir} already holds a run ({listed}): continue it with --resume auto, choose another "
                    f"--out, or pass --overwrite to move the old run aside")
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(json.dumps({"event": "overwrite", "note": f"the earlier run in {run_dir} was moved to {aside}"}),
              flush=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as e:
        return f"cannot write to the run folder {run_dir}: {e.strerror or e}"
    if resume_inside:
        later = [p.name for p in CheckpointManager(run_dir).paths()
                 if CheckpointManager.step_of(p) > CheckpointManager.step_of(Path(cfg.resume))]
        if later:
            warnings.warn(f"resuming from {cfg.resume}: the later checkpoints {', '.join(later)} belong to the "
                          f"run before this resume and are deleted when this run saves its first checkpoint",
                          stacklevel=2)
    return None


def _resume_checkpoint(cfg: PretrainConfig, ckpts: CheckpointManager, main: bool) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its state: the newest readable one for ``auto`` (None
    when there is none), else the named one. Refuses another per-device batch or accumulation
    (the data order and the schedule are counted in their batches)."""
    if cfg.resume == "auto":
        found = ckpts.latest_readable(cfg)
        if found is None and main:
            print(json.dumps({"event": "resume", "note": f"no checkpoint in {ckpts.run_dir}; starting fresh"}),
                  flush=True)
    else:
        found = Path(cfg.resume), CheckpointManager.load(cfg.resume, cfg)
    if found is not None:
        saved = found[1].get("config", {})
        was = (saved.get("batch_size", cfg.batch_size), saved.get("accum_steps", cfg.accum_steps))
        if was != (cfg.batch_size, cfg.accum_steps):
            raise ConfigError(f"cannot resume {found[0]} with batch_size {cfg.batch_size} x accum_steps "
                              f"{cfg.accum_steps}: the run was started with batch_size {was[0]} x accum_steps "
                              f"{was[1]}; resume with --batch-size {was[0]} --accum-steps {was[1]}, or start a "
                              f"new --out")
    return found


def _check_free_space(run_dir: Path, model: nn.Module, keep_last: int) -> None:
    """Warn when the disk cannot hold the checkpoints this run keeps (weights, buffers and two LAMB
    moments per trained parameter; ``keep_last`` of them plus the one being written)."""
    weights = state_bytes(model.state_dict())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = (weights + moments) * (keep_last + 1) + weights
    free = shutil.disk_usage(run_dir).free
    if free < need:
        warnings.warn(f"{run_dir} has {free / 2**20:,.0f} MiB free, but this run's checkpoints need about "
                      f"{need / 2**20:,.0f} MiB ({keep_last} kept + 1 being written, {(weights + moments) / 2**20:,.0f} "
                      f"MiB each); free space or lower --keep-last", stacklevel=2)


def _display_images(dataset: ImageFiles, seed: int, bad_files: BadFiles, count: int = 8) -> torch.Tensor:
    """``count`` readable images spread over the (sorted) data set, so a class-per-folder tree shows
    several classes; unreadable files met on the way are reported like those met in training."""
    n = min(count, len(dataset))
    images = []
    for i in sorted({k * len(dataset) // n for k in range(n)}):
        image, bad = dataset.readable((seed, -1, i))
        bad_files.add(bad)
        images.append(image)
    return torch.stack(images)


def _every(n: int, i: int) -> bool:
    """True every ``n``-th count ``i``; never when ``n`` is 0 (off)."""
    return n > 0 and i % n == 0


def _yaml(cfg: PretrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
