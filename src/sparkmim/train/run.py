"""A pre-training run: set-up, resume, the epoch loop around :func:`train_step`, checkpoints,
reconstruction grids and the summary (no argparse here)."""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import CheckpointManager, RunCheckpoint, RunState
from ..config import DEMO_DATA, ConfigError, PretrainConfig, flag_of, given_options, replace_config
from ..data import BadFiles, DataError, EpochSampler
from ..distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object
from ..masking import MaskPyramid, grid_of, num_visible, seed_for
from ..modality import modality_for
from ..optim import Schedule
from ..released import continue_reference
from ..sources import ReleasedRun
from ..visualize import reconstruction_grid, save_grid
from ..weights import atomic_write, export_backbone
from .capture import CapturedStep
from .folder import check_free_space, check_run_dir, checkpoint_bytes, resume_checkpoint, take_run_dir
from .loop import NonFiniteLossError, StepStats, apply_schedule, train_step
from .memory import available_memory, check_memory, step_memory
from .metrics import Metrics, Window
from .setup import (
    autocast_for,
    build_model,
    build_optimizer,
    crop_from_plans,
    resolve_device,
    resolve_precision,
    width_from_encoder,
)

__all__ = ["pretrain", "Run", "LOW_LR", "COARSE_GRID"]

# a peak lr below this is far below the recipes' (1e-3 in the demos, 8e-4 and up at full scale)
LOW_LR = 1e-4
# a mask grid of fewer patches than this (3 x 3) is called too coarse at start: the paper masks a 7 x 7 grid
COARSE_GRID = 9
# a run that waits for data longer than this share of its step time says so, once
SLOW_DATA = 0.2


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) a pre-training job described by ``cfg``; returns the final summary."""
    from ..distributed import cleanup, init_distributed

    info, device = init_distributed(resolve_device(cfg.device), cfg.dist_timeout)
    run = None
    try:
        run = Run(cfg, info, device)
        return run.summary(0.0) if run.finished else run.train()
    finally:
        # in order: the run's loader workers, DDP wrapper and process-group users first, then the
        # process group itself; a process group freed later, by the interpreter at exit, can abort
        # the process after a finished run
        if run is not None:
            run.close()
        del run
        cleanup()


class Run:
    """One run in its folder, on one rank. Building it claims the folder, builds data, model and
    optimiser, and resumes from a checkpoint when asked (``finished`` tells whether anything is
    left to do); :meth:`train` runs the remaining epochs and returns the summary."""

    def __init__(self, cfg: PretrainConfig, info: DistInfo, device: torch.device):
        if cfg.resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            cfg = replace_config(cfg, resume="auto")  # torchrun restarted the workers: continue the run
        cfg, self.crop_taken = crop_from_plans(cfg)
        self.info, self.device, self.main = info, device, info.main
        self.modality = modality_for(cfg.model)  # images or volumes: decided here, once
        self.modality.check(cfg)
        self.source = self.modality.data_source(cfg)  # what --data is: decided here, once
        cfg, self.channels_taken = self._channels_from_data(cfg)  # volumes take any count: no second check
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.lock = None
        # all ranks fail alike; a benchmark writes nothing, so any folder will do
        problem = broadcast_object(check_run_dir(self.run_dir, cfg) if self.main and not cfg.benchmark else None)
        if problem:
            raise ConfigError(problem)
        self._build()
        self.state, self.resumed_window = RunState(world=info.world), None
        self.finished = self._resume()
        if not self.finished:  # the run can start: only now is its folder made (or an old run moved aside)
            self.bad = BadFiles(self.state.bad_files)
            self.bad.add(self.missing.items())  # listed files that do not exist: announced with the first sync
            self._claim_folder()
            try:
                self._prepare()
            except BaseException:
                self.close()  # the folder's lock, first of all
                raise

    def _channels_from_data(self, cfg: PretrainConfig) -> tuple[PretrainConfig, int | None]:
        """The data set's channel count (an nnU-Net dataset's, a cache's) where the user gave none;
        a count the user gave is kept (and refused by the reader if it differs)."""
        found = self.modality.data_channels(self.source)
        if found is None or found == cfg.in_chans or "in_chans" in given_options(cfg):
            return cfg, None
        return replace_config(cfg, in_chans=found), found

    def _claim_folder(self) -> None:
        """Rank 0 reads the images the reconstruction grids show (a data set none of whose files
        can be read fails here, before anything is written), then takes the run folder and holds
        it (:func:`take_run_dir`); every rank fails alike when either cannot be done."""
        problem = None
        self.vis_images, self.vis_names = None, None
        if self.main:
            try:
                self.vis_images, self.vis_names = self._display_images()
                if not self.cfg.benchmark:  # a benchmark writes nothing
                    self.lock = take_run_dir(self.run_dir, self.cfg)
            except (ConfigError, DataError) as e:
                problem = e
        message = broadcast_object(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message:
            raise ConfigError(message)

    # -- set-up --------------------------------------------------------------------------------
    def _build(self) -> None:
        """The model first (a mistyped name fails before the data are listed), then the data, then
        the memory a step needs (refused when it cannot fit), the optimiser and the schedule."""
        cfg, info = self.cfg, self.info
        self.precision = resolve_precision(cfg.precision, self.device)
        self.memory_format = self.modality.memory_format(cfg.channels_last, self.device)
        self.channels_last = self.memory_format != torch.contiguous_format
        self.dtype = torch.float64 if self.precision == "fp64" else None
        torch.manual_seed(cfg.seed)
        auto_width = width_from_encoder(cfg, self.modality)
        self.model = build_model(cfg, self.modality, auto_width).to(self.device, self.dtype)
        if auto_width:  # recorded as a number, so that the run's files rebuild this model
            self.cfg = cfg = replace_config(cfg, decoder_width=self.model.decoder_width)
        self.width_taken = self.model.decoder_width if auto_width else None
        # parameters without a gradient (e.g. a timm head's norm) are left out of training, so DDP
        # need not search the graph for them each step; they are still exported unchanged
        self.unused = self.model.unused_parameters()
        for name in self.unused or ():
            self.model.get_parameter(name).requires_grad_(False)
        self.dataset, self.mean, self.std, self.missing = self.modality.pretrain_data(cfg, self.source)
        if self.main and cfg.data != DEMO_DATA:
            self.modality.warn_if_small(cfg, self.dataset.paths)
        self._fit_batch_to_data()
        cfg = self.cfg
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, seed=cfg.seed, rank=info.rank, world=info.world,
                                    kind=self.dataset.kind)
        steps_per_epoch = self.sampler.batches_per_epoch() // cfg.accum_steps
        if steps_per_epoch < 1:
            raise ConfigError(f"an epoch of {self.sampler.batches_per_epoch()} batches is shorter than "
                              f"accum_steps={cfg.accum_steps}")
        self.steps_per_epoch, self.total_steps = steps_per_epoch, cfg.epochs * steps_per_epoch
        self._check_memory()
        self._prepare_model()
        self.effective_batch = cfg.batch_size * cfg.accum_steps * info.world
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.base_lr * self.effective_batch / 256
        self.optimizer = build_optimizer(self.model, cfg, self.peak_lr)
        self.schedule = Schedule(self.peak_lr, self.total_steps, round(cfg.warmup_epochs * steps_per_epoch),
                                 cfg.warmup_start_ratio, cfg.final_lr_ratio, cfg.weight_decay, cfg.weight_decay_end)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.autocast = autocast_for(self.precision, self.device)
        self.ckpts = CheckpointManager(self.run_dir, cfg.keep_last)

    def _fit_batch_to_data(self) -> None:
        """A data set smaller than one batch of a batch size the user did not give (a recipe's or
        the default) runs with the largest batch it fills, stated in a warning; a batch size given
        is kept (and refused by the sampler when the data cannot fill it)."""
        cfg, world = self.cfg, self.info.world
        fits = len(self.dataset) // world
        if len(self.dataset) >= cfg.batch_size * world or "batch_size" in given_options(cfg) or fits < 1:
            return
        if self.main:
            warnings.warn(f"the data set has {len(self.dataset)} {self.dataset.kind}s, fewer than one batch of "
                          f"{cfg.batch_size}{f' x {world} devices' if world > 1 else ''}: this run uses --batch-size "
                          f"{fits} (give --batch-size to choose another)", stacklevel=3)
        self.cfg = replace_config(cfg, batch_size=fits)

    def _check_memory(self) -> None:
        """The memory a step of this model, batch and crop needs (:func:`step_memory`), refused when
        more than the device has and warned about when most of it (:func:`check_memory`)."""
        cfg = self.cfg
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        shape = (cfg.in_chans, *self.modality.input_shape(cfg))
        self.step_memory = step_memory(self.model, shape, cfg.batch_size, half)
        crop = " x ".join(f"{flag_of(o)} {v}" for o, v in dict(zip(self.modality.crop_options(), shape[1:])).items())
        problem = None
        try:
            with warnings.catch_warnings():
                if not self.main:  # one rank says it
                    warnings.simplefilter("ignore")
                check_memory(self.step_memory, available_memory(self.device), self.device, crop)
        except ConfigError as e:
            problem = e
        found = [p for p in all_gather_objects(None if problem is None else str(problem)) if p]
        if problem is not None:
            raise problem
        if found:  # another rank's device cannot hold the step: every rank stops alike
            raise ConfigError(found[0])

    def _prepare_model(self) -> None:
        import torch.distributed as dist

        model = self.model
        if self.channels_last:
            model = model.to(memory_format=self.memory_format)
        if self.info.world > 1 and self.cfg.sync_bn:
            model.set_sync_group(dist.group.WORLD)
        if self.cfg.compile:
            # the dense decoder holds most of the arithmetic; the sparse encoder stays eager (its
            # torch-function mode traces with PyTorch 2.14 but not with every older release)
            model.decoder.compile()
        self.model = model

    def _resume(self) -> bool:
        """Load the checkpoint to resume from, if any; True when the run had already finished."""
        found = resume_checkpoint(self.cfg, self.ckpts, self.main) if self.cfg.resume else None
        if found is None:
            return False
        if isinstance(found, ReleasedRun):
            return self._resume_reference(found.path, found.state)
        self.model.load_state_dict(found.model)
        self.optimizer.load_state_dict(found.optimizer)
        self.scaler.load_state_dict(found.scaler)
        self.resumed_window = found.window  # the sums of the metric line in progress (older checkpoints: none)
        self.state = found.progress.for_world(self.info.world, self.cfg.batch_size, self.effective_batch)
        finished = self.state.epoch >= self.cfg.epochs
        if self.main:
            print(json.dumps({"event": "resume", "checkpoint": str(found.path), "epoch": self.state.epoch,
                              "step": self.state.step, "world": self.info.world,
                              "checkpoint_world": found.progress.world}), flush=True)
            Metrics.truncate(self.run_dir, self.state.step)  # lines logged after the checkpoint come again
            if finished:
                print(json.dumps({"event": "resume", "note": f"the run in {self.run_dir} had already finished "
                                  f"({self.state.epoch} of {self.cfg.epochs} epochs, step {self.state.step}); "
                                  f"nothing to do"}), flush=True)
        return finished

    def _resume_reference(self, path: Path, saved: dict) -> bool:
        """Continue one of the paper's released runs: its whole model, its LAMB moments and step
        count, and its epoch. The run goes on at the epoch after the file's, at the same place of
        this run's lr and weight-decay schedules (which count this run's steps per epoch, so a
        different batch size or data set only changes how many steps an epoch has)."""
        cfg = self.cfg
        epoch = int(saved.get("epoch", -1)) + 1
        if epoch >= cfg.epochs:
            raise ConfigError(f"{path} ended its run at epoch {epoch}; --epochs {cfg.epochs} leaves nothing to "
                              f"continue: give more epochs (e.g. --epochs {epoch + 100}), or --init {path} to start a "
                              f"new schedule from its weights", ["epochs", "resume"])
        loaded = continue_reference(self.model, self.optimizer, saved, input_size=cfg.input_size)
        step = epoch * self.steps_per_epoch
        self.state = RunState(epoch=epoch, step=step, images_seen=step * self.effective_batch, world=self.info.world)
        if self.main:
            print(json.dumps({"event": "resume", "checkpoint": str(path), "kind": "reference SparK run",
                              "arch": saved.get("arch"), "epoch": epoch, "step": step, **loaded,
                              "lr_now": self.schedule.lr(step), "peak_lr": self.peak_lr}), flush=True)
        return False

    def _prepare(self) -> None:
        cfg = self.cfg
        self.checkpoint_bytes = checkpoint_bytes(self.model)
        if self.main and not cfg.benchmark:
            atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(_yaml(cfg)))
            if self.bad.files:  # the list as of the checkpoint (a resume finds later ones again)
                atomic_write(self.run_dir / "bad_images.txt", lambda tmp: BadFiles.write(tmp, self.bad.files.items()))
            else:
                (self.run_dir / "bad_images.txt").unlink(missing_ok=True)
            check_free_space(self.run_dir, self.model, cfg.keep_last)
        self.ddp = self._wrap_ddp()
        self.step = self._step_function()
        loader_kw = dict(num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                         pin_memory=self.device.type == "cuda")
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                                  collate_fn=self.dataset.collate, drop_last=True, **loader_kw)
        self.metrics = Metrics(self.run_dir, cfg.tensorboard) if self.main and not cfg.benchmark else None
        self.window = Window(self.device)
        if self.resumed_window:
            self.window.load_state_dict(self.resumed_window, losses=self.main)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.step_images, self.data_seconds, self.slow_data_said, self.windows = 0, 0.0, False, 0

    def _step_function(self):
        """The engine's step: :func:`train_step`, or with ``--capture`` the same step recorded once as
        a CUDA graph and replayed."""
        cfg = self.cfg
        kw = dict(accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad, autocast=self.autocast)
        if not cfg.capture:
            return partial(train_step, self.model, self.optimizer, self.scaler, ddp=self.ddp, **kw)
        problems = [why for bad, why in ((self.device.type != "cuda", f"a CUDA device (this run uses {self.device})"),
                                         (self.info.world > 1, "one process (this run has several ranks)"),
                                         (self.precision == "fp16", "bf16 or fp32 (fp16 scaling reads the host)"))
                    if bad]
        if problems:
            raise ConfigError(f"--capture needs {' and '.join(problems)}; run without --capture")
        return CapturedStep(self.model, self.optimizer, self.scaler, **kw)

    def _wrap_ddp(self):
        if self.info.world == 1:
            return None
        from torch.nn.parallel import DistributedDataParallel

        # buffers: with sparse SyncBatchNorm every rank computes the same running statistics, so
        # copying rank 0's before each forward is wasted work (the keyword was renamed in torch 2.12)
        sync_buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers"
        return DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=self.unused is None, **{sync_buffers: not self.cfg.sync_bn})

    def _display_images(self, count: int = 8) -> tuple[Tensor, list[str]]:
        """``count`` readable images spread over the (sorted) data set, so a class-per-folder tree
        shows several classes, and their names; unreadable files met on the way are reported like
        those in training."""
        n = min(count, len(self.dataset))
        images, names = [], []
        for i in sorted({k * len(self.dataset) // n for k in range(n)}):
            image, bad, used = self.dataset.readable((self.cfg.seed, -1, i))
            self.bad.add(bad)
            images.append(image)
            names.append(self.dataset.name_of(used))
        return torch.stack(images), names

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        """The remaining epochs; then the encoder weights are exported. Returns the summary (with
        ``--benchmark N``, the figures of N steps instead: :meth:`benchmark`)."""
        started = time.perf_counter()
        self._announce()
        if self.cfg.benchmark:
            return self.benchmark(self.cfg.benchmark)
        self._sync_bad_files()  # files listed but missing, or met while picking the display images
        if self.state.step == 0:
            self._visualise("epoch0000_start")
        if self.metrics is not None and self.cfg.progress:
            self.metrics.open_bar(self.total_steps, self.state.step)
        self.model.train()
        try:
            for epoch in range(self.state.epoch, self.cfg.epochs):
                self._epoch(epoch)
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self.main:
            self._export()
        barrier()
        return self.summary(time.perf_counter() - started)

    def _announce(self) -> None:
        if not self.main:
            return
        if self.schedule.warmup_steps >= self.total_steps > 0:
            warnings.warn(f"the warm-up ({self.schedule.warmup_steps} steps, {self.cfg.warmup_epochs:g} epochs) is not "
                          f"shorter than the run ({self.total_steps} steps): the lr never reaches its peak "
                          f"{self.peak_lr:.3g}; lower --warmup-epochs", stacklevel=3)
        if self.cfg.lr is None and self.peak_lr < LOW_LR:
            warnings.warn(f"the peak lr {self.peak_lr:.3g} (base_lr {self.cfg.base_lr:g} x effective batch "
                          f"{self.effective_batch} / 256, the paper's rule for batches of 4096) is far below what the "
                          f"recipes use (1e-3 in the demos, 8e-4 to 3.2e-3 at full scale), so a short run may not "
                          f"learn: raise the effective batch with --accum-steps, set --lr (e.g. 1e-3), or start from "
                          f"a recipe (--config demo)", stacklevel=3)
        self._warn_if_coarse()
        mib = self.checkpoint_bytes / 2**20
        print(json.dumps({"event": "start", "model": self.cfg.model, "images": len(self.dataset),
                          "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                          "effective_batch": self.effective_batch, "peak_lr": self.peak_lr, "device": str(self.device),
                          "precision": self.precision, "channels_last": self.channels_last,
                          "strides": self.model.encoder.strides, "world": self.info.world,
                          "sync_bn": self.info.world > 1 and self.cfg.sync_bn,
                          "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 2),
                          "checkpoint_mib": round(mib), "checkpoints_mib": round(mib * self.cfg.keep_last),
                          "step_memory_mib": round(self.step_memory.total / 2**20),
                          **({"crop_from_plans": self.crop_taken} if self.crop_taken else {}),
                          **({"in_chans_from_data": self.channels_taken} if self.channels_taken else {}),
                          **({"decoder_width_from_encoder": self.width_taken} if self.width_taken else {}),
                          "data": {"kind": self.source.kind, "path": str(self.source)},
                          "run_dir": str(self.run_dir)}), flush=True)

    def _warn_if_coarse(self) -> None:
        """A grid of a few patches leaves a handful visible, each alone at the deepest stage (one site
        per patch there): the encoder learns little context (docs/experiments.md, "SparK on volumes")."""
        patch = self.model.patch_size
        grid = grid_of(self.modality.input_shape(self.cfg), patch)
        patches = math.prod(grid)
        if patches >= COARSE_GRID:
            return

        def shown(sizes) -> str:
            return "x".join(map(str, sizes))

        crops = ", ".join(f"--{o.replace('_', '-')}" for o in dict.fromkeys(self.modality.crop_options()))
        finer = [s for s in self.model.encoder.strides if max(s) < max(patch)]
        hint = (f", or decode from fewer stages (--feature-modules: the patch becomes the last decoded stage's "
                f"stride, e.g. {shown(finer[-1])})" if finer else "")
        warnings.warn(f"the mask grid is {shown(grid)} ({patches} patches of {shown(patch)}, "
                      f"{num_visible(patches, self.model.mask_ratio)} visible), far coarser than the paper's 7x7 at "
                      f"224 px: the masked patches are guessed from very little context; use a larger crop "
                      f"({crops}){hint}", stacklevel=3)

    def benchmark(self, steps: int) -> dict:
        """Run ``steps`` training steps (no checkpoint, grid or log) and measure them, the first
        one left out (it starts the data-loading workers): images per second, the share of step
        time spent waiting for data, and the time the whole schedule would take at that pace."""
        cfg, state = self.cfg, self.state
        wanted, done, seconds, images, waiting = min(steps, self.total_steps), 0, 0.0, 0, 0.0
        self.model.train()
        epoch = state.epoch
        while done < wanted:
            self.sampler.set_epoch(epoch)
            batches = enumerate(self.loader)
            for _ in range(min(self.sampler.batches_per_epoch() // cfg.accum_steps, wanted - done)):
                started = time.perf_counter()
                apply_schedule(self.optimizer, self.schedule, state.step)
                self.step(self._micro_batches(batches))
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the step's own time, not its launch
                if done > 0:
                    seconds += time.perf_counter() - started
                    images += self.step_images * self.info.world
                    waiting += self.data_seconds
                self.step_images, self.data_seconds = 0, 0.0
                state.step += 1
                done += 1
            epoch += 1
        timed = max(done - 1, 1)
        step_s = seconds / timed if seconds else float("nan")
        result = {"event": "benchmark", "model": cfg.model, "device": str(self.device), "precision": self.precision,
                  "steps": done, "timed_steps": done - 1, "batch": cfg.batch_size, "workers": cfg.workers,
                  "img_per_s": round(images / seconds, 2) if seconds else None, "step_s": round(step_s, 4),
                  "data_wait": round(waiting / seconds, 3) if seconds else None,
                  "run_steps": self.total_steps, "estimated_run_h": round(step_s * self.total_steps / 3600, 2)}
        if self.main:
            self._warn_if_waiting(result["data_wait"])
        return result

    def _warn_if_waiting(self, share: float | None) -> None:
        """Say once when more than a fifth of the step time goes to waiting for data."""
        if share is None or share <= SLOW_DATA or self.slow_data_said:
            return
        self.slow_data_said = True
        stored = self.source.kind in ("cache", "nnunet-preprocessed")  # read by region already
        warnings.warn(f"{share:.0%} of the step time went to waiting for data: raise --workers (now "
                      f"{self.cfg.workers}){'' if stored else self.modality.slow_data_hint}", stacklevel=3)

    def _epoch(self, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        skip = state.batch if epoch == state.epoch else 0
        state.epoch, state.batch = epoch, skip
        self.sampler.set_epoch(epoch, skip)
        batches = enumerate(self.loader, start=skip)
        for _ in range((self.sampler.batches_per_epoch() - skip) // cfg.accum_steps):
            apply_schedule(self.optimizer, self.schedule, state.step)
            stats = self.step(self._micro_batches(batches))
            self._after_step(stats)
        state.epoch, state.batch = epoch + 1, 0
        if _every(cfg.save_every_epochs, epoch + 1) or epoch + 1 == cfg.epochs:
            self._save()
        if _every(cfg.vis_every_epochs, epoch + 1) or epoch + 1 == cfg.epochs:
            self._visualise(f"epoch{epoch + 1:04d}")

    def _micro_batches(self, batches: Iterator) -> Iterator[tuple[Tensor, MaskPyramid]]:
        """The step's micro-batches on the device, each with its masks and the seed of stochastic
        layers: pure functions of (seed, step, micro-batch), so a resumed run draws the same."""
        for micro in range(self.cfg.accum_steps):
            waited = time.perf_counter()
            index, (images, bad) = next(batches)  # the only place the run waits for data
            self.data_seconds += time.perf_counter() - waited
            self.bad.add(bad)
            self.state.batch = index + 1
            images = images.to(self.device, self.dtype, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=self.memory_format)
            self.step_images += images.shape[0]
            torch.manual_seed(seed_for(self.cfg.seed, self.state.step, micro, "layers"))  # stochastic depth etc.
            # drawn on the images' device (no host-to-device copy on a GPU); the same masks on resume
            masks = torch.Generator(self.device).manual_seed(seed_for(self.cfg.seed, self.state.step, micro, "masks"))
            yield images, self.model.draw_masks(images, masks, self.info.rank, self.info.world)

    def _after_step(self, stats: StepStats) -> None:
        cfg, state = self.cfg, self.state
        self.nonfinite |= stats.nonfinite
        self.window.add(stats, self.step_images, self.data_seconds)
        self.step_images, self.data_seconds = 0, 0.0
        state.step += 1
        state.images_seen += self.effective_batch
        if state.first_loss is None and state.step == 1:
            state.first_loss = self._mean_loss(stats.loss_sum, stats.micro_batches)  # one host read per run
        if state.step % cfg.log_every_steps == 0 or state.step == self.total_steps:
            self._log()
        if self.metrics is not None:
            self.metrics.stepped()
        if _every(cfg.save_every_steps, state.step) and state.batch < self.sampler.batches_per_epoch():
            self._save()

    @staticmethod
    def _loss_totals(loss_sum: Tensor, micro_batches: int) -> Tensor:
        """The summed loss and the micro-batches it sums, over all ranks (float64)."""
        count = loss_sum.new_tensor(float(micro_batches), dtype=torch.float64)
        return all_reduce_sum(torch.stack([loss_sum.double(), count]))

    def _mean_loss(self, loss_sum: Tensor, micro_batches: int) -> float:
        """The mean loss over the micro-batches of all ranks."""
        totals = self._loss_totals(loss_sum, micro_batches)
        return float(totals[0] / totals[1])

    def _window_state(self) -> dict:
        """The metric window for a checkpoint: its loss sums over all ranks (rank 0 takes them back
        on a resume, the other ranks start from zero), its gradient-norm sums (the same on every rank)."""
        loss, micro = self._loss_totals(self.window.loss_sum, self.window.micro_batches).cpu()
        return {**self.window.state_dict(), "loss_sum": loss, "micro_batches": int(micro)}

    def _log(self) -> None:
        self._check_finite("logging")
        state, window = self.state, self.window
        state.last_loss = self._mean_loss(window.loss_sum, window.micro_batches)
        self._sync_bad_files()
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        data_wait = min(1.0, window.data_seconds / elapsed)
        record = {"step": state.step, "epoch": state.epoch, "loss": state.last_loss, "grad_norm": window.grad_norm(),
                  "lr": self.schedule.lr(state.step - 1), "weight_decay": self.schedule.weight_decay(state.step - 1),
                  "img_per_s": window.images * self.info.world / elapsed, "data_wait": round(data_wait, 3),
                  "eta_s": round(elapsed / max(window.steps, 1) * (self.total_steps - state.step), 1),
                  "bad_images": len(self.bad), "images_seen": state.images_seen}
        self.windows += 1
        if self.main and self.windows > 1:  # the first window starts the data-loading workers
            self._warn_if_waiting(data_wait)
        if self.metrics is not None:
            self.metrics.log(record)
        window.reset()

    def _check_finite(self, where: str) -> None:
        if bool(all_reduce_sum(self.nonfinite.float())):
            raise NonFiniteLossError(
                f"the loss became NaN or infinite before {where} (step {self.state.step}); the run stopped and the "
                f"last good checkpoint in {self.run_dir} was kept. Lower the learning rate, use bf16 instead of fp16, "
                f"or check the data.")

    def _sync_bad_files(self) -> None:
        """Unreadable files found by any rank since the last call: recorded on every rank, announced
        (one line each) and appended to bad_images.txt by rank 0; then the --max-bad-fraction rule."""
        pending, self.bad.pending = self.bad.pending, []
        if self.info.world > 1 and int(all_reduce_sum(torch.tensor(float(len(pending)), device=self.device))) > 0:
            pending = [p for part in all_gather_objects(pending) for p in part]
        new = self.bad.merge(pending)
        listing = self.run_dir / "bad_images.txt"
        if self.main and new:
            for path, reason in new:
                warnings.warn(f"skipping unreadable {self.dataset.kind} {path} ({reason}); listed in {listing}",
                              stacklevel=2)
            BadFiles.write(listing, new)
        read = min(len(self.dataset), self.state.images_seen) + len(self.missing)
        if read >= min(64, len(self.dataset) + len(self.missing)) and len(self.bad) > self.cfg.max_bad_fraction * read:
            raise DataError(f"{len(self.bad)} of the {read} {self.dataset.kind} files read so far are unreadable "
                            f"(more than --max-bad-fraction {self.cfg.max_bad_fraction:g}); they are listed in "
                            f"{listing}: fix or remove them, or raise --max-bad-fraction")

    def _save(self) -> None:
        """A checkpoint of the state after the last step, written by rank 0 (all ranks wait for it)."""
        self._check_finite("a checkpoint")
        self._sync_bad_files()
        self.state.bad_files = dict(self.bad.files)
        window = self._window_state()
        if self.main:
            self.ckpts.save(RunCheckpoint(None, self.model.state_dict(), self.optimizer.state_dict(),
                                          self.scaler.state_dict(), self.state, self.cfg.to_dict(), window,
                                          list(self.mean), list(self.std)))
        barrier()  # no rank runs ahead of a checkpoint being written

    def _visualise(self, tag: str) -> None:
        if not self.main:
            return
        model = self.model
        model.eval()
        images = self.vis_images.to(self.device, next(model.parameters()).dtype)
        rec = model.reconstruct(images, visible=model.draw_masks(images, torch.Generator().manual_seed(self.cfg.seed)))
        model.train()
        grid = reconstruction_grid(rec, self.mean, self.std, names=self.vis_names, modality=self.modality)
        save_grid(grid, self.run_dir / "reconstructions" / f"{tag}.png")
        self.metrics.image("reconstruction", grid, self.state.step)

    def _export(self) -> None:
        """The encoder's weights with the original model's keys; for a timm backbone also a timm
        model folder, ``timm/``."""
        export_backbone(self.model.encoder.model, self.run_dir / "encoder.safetensors", mean=self.mean, std=self.std,
                        input_size=self.cfg.input_size, architecture=self.cfg.model)

    def close(self) -> None:
        """Release what the run holds beyond its results: the data-loader workers (joined), the DDP
        wrapper, the step function and the model's sync group, the metric files. Idempotent."""
        import gc

        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        self.loader = self.ddp = self.step = None  # a loader's workers stop when it is freed
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.info.world > 1 and self.cfg.sync_bn:
            self.model.set_sync_group(None)
        gc.collect()  # now, not whenever the interpreter gets to it

    def summary(self, seconds: float) -> dict:
        """The run's last line; valid JSON (a loss never logged is null)."""
        def finite(v):
            return v if v is not None and math.isfinite(v) else None

        state = self.state
        return {"event": "done", "epochs": self.cfg.epochs, "steps": state.step, "images_seen": state.images_seen,
                "bad_images": len(state.bad_files if self.finished else self.bad), "loss_first": finite(state.first_loss),
                "loss_last": finite(state.last_loss), "seconds": round(seconds, 1),
                "encoder_weights": str(self.run_dir / "encoder.safetensors"), "run_dir": str(self.run_dir)}


def _every(n: int, i: int) -> bool:
    """True every ``n``-th count ``i``; never when ``n`` is 0 (off)."""
    return n > 0 and i % n == 0


def _yaml(cfg: PretrainConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
