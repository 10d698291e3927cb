"""What a user hands in: the one reader that turns a path given to ``--init``, ``--resume``,
``export``, ``reconstruct`` or ``evaluate --weights`` into exactly one kind of source.

* :class:`RunFolder`: a sparkmim run folder (its checkpoints, ``encoder.safetensors``,
  ``config.yaml``);
* :class:`~sparkmim.checkpoint.RunCheckpoint`: one of its ``checkpoint-<step>.pth`` files;
* :class:`ReleasedRun`: one of the paper's released ``_withdecoder_..._spark_style.pth`` files
  (the whole SparK model, its LAMB state and epoch: :mod:`sparkmim.released`);
* :class:`EncoderWeights`: a backbone's weights alone: a sparkmim export (``.safetensors`` or
  ``.pth``), a released ``_timm_style.pth`` file, or a state dict as training scripts write them
  (bare, or under ``state_dict`` / ``model``).

Each knows the architecture it was made for where the file tells (:attr:`architecture`) and gives
the backbone's weights with the backbone's own keys (``backbone_weights()``); the entry points
dispatch on the type once. Torch files are read as plain data only
(:func:`~sparkmim.weights.load_plain`): a file holding Python objects is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from .checkpoint import CHECKPOINT_PATTERN, CheckpointManager, RunCheckpoint, checkpoint_paths
from .released import is_spark_style, reference_encoder
from .weights import (
    ENCODER_PREFIX,
    CheckpointError,
    encoder_weights,
    load_plain,
    read_file,
    weights_architecture,
)

__all__ = ["RunFolder", "ReleasedRun", "EncoderWeights", "Source", "read_source", "checkpoint_of",
           "backbone_weights_of", "backbone_state", "kind_of"]


@dataclass(frozen=True)
class RunFolder:
    """A sparkmim run folder."""

    path: Path

    @property
    def architecture(self) -> str | None:
        """The run's ``--model`` (its ``config.yaml``, else its newest checkpoint's config)."""
        found = weights_architecture(self.path / "encoder.safetensors")
        if found is None and checkpoint_paths(self.path):
            found = self.checkpoint().architecture
        return found

    def checkpoint(self, cfg=None) -> RunCheckpoint:
        """The newest checkpoint that reads (an unreadable newer one is skipped with a warning);
        with ``cfg``, one whose architecture settings differ is refused."""
        found = CheckpointManager(self.path).latest_readable(cfg)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint-*.pth in {self.path}")
        return found

    def backbone_weights(self) -> dict[str, Tensor]:
        """The exported ``encoder.safetensors`` where the run finished, else the encoder of its
        newest checkpoint."""
        exported = self.path / "encoder.safetensors"
        if exported.is_file():
            return EncoderWeights.read(exported).backbone_weights()
        return self.checkpoint().backbone_weights()


@dataclass(frozen=True)
class ReleasedRun:
    """One of the paper's released whole-model files (``_withdecoder_..._spark_style.pth``)."""

    path: Path
    state: dict

    @property
    def architecture(self) -> str | None:
        arch = self.state.get("arch")
        return arch if isinstance(arch, str) else None

    @property
    def input_size(self) -> int:
        return int(self.state.get("input_size", 224))

    def backbone_weights(self) -> dict[str, Tensor]:
        """Its encoder, with the backbone's own keys (ConvNeXt keys renamed to timm's)."""
        return reference_encoder(self.state["module"])


@dataclass(frozen=True)
class EncoderWeights:
    """A backbone's weights alone, with its own keys."""

    path: Path
    state: dict
    architecture: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> EncoderWeights:
        path = Path(path)
        return cls(path, backbone_state(read_file(path)), weights_architecture(path))

    def backbone_weights(self) -> dict[str, Tensor]:
        return self.state


Source = RunFolder | RunCheckpoint | ReleasedRun | EncoderWeights


def kind_of(source: Source) -> str:
    """A few words saying what ``source`` is (for events and messages)."""
    return {RunFolder: "run folder", RunCheckpoint: "training checkpoint", ReleasedRun: "reference SparK checkpoint",
            EncoderWeights: "encoder weights"}[type(source)]


def read_source(path: str | Path) -> Source:
    """What ``path`` is, read once: a run folder, a training checkpoint (a file named as sparkmim
    names them must be one), one of the paper's released whole-model files, or encoder weights.
    :class:`FileNotFoundError` for a path that does not exist or a folder that holds no run;
    :class:`~sparkmim.weights.CheckpointError` for a file that cannot be read."""
    p = Path(path)
    if p.is_dir():
        if not checkpoint_paths(p) and not (p / "encoder.safetensors").is_file():
            raise FileNotFoundError(f"{p} holds neither encoder.safetensors nor a checkpoint-*.pth: not a sparkmim "
                                    f"run folder")
        return RunFolder(p)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (give a run folder, a checkpoint or a weights file)")
    if p.suffix == ".safetensors":
        return EncoderWeights.read(p)
    named_checkpoint = fnmatch.fnmatch(p.name, CHECKPOINT_PATTERN)
    state = load_plain(p, "checkpoint" if named_checkpoint else "weights file")
    if named_checkpoint or _is_run_checkpoint(state):
        return CheckpointManager.load(p, state=state)
    if is_spark_style(state):
        return ReleasedRun(p, state)
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read weights file {p}: it holds a {type(state).__name__}, not weights")
    return EncoderWeights(p, backbone_state(state), weights_architecture(p))


def checkpoint_of(source: Source, cfg=None) -> RunCheckpoint | None:
    """The training checkpoint a run folder (its newest readable one) or a checkpoint gives; with
    ``cfg``, one whose architecture settings differ is refused. None for the other kinds."""
    if isinstance(source, RunFolder):
        return source.checkpoint(cfg)
    if isinstance(source, RunCheckpoint):
        if cfg is not None:
            source.check_settings(cfg)
        return source
    return None


def backbone_weights_of(path: str | Path) -> dict[str, Tensor]:
    """The backbone's weights (its own keys) in whatever ``path`` is: a run folder's exported
    ``encoder.safetensors`` (else its newest checkpoint's encoder), a checkpoint's encoder, a
    released file's encoder, or encoder weights."""
    return read_source(path).backbone_weights()


def _is_run_checkpoint(state: object) -> bool:
    return isinstance(state, dict) and isinstance(state.get("model"), dict) and "step" in state \
        and isinstance(state.get("config"), dict)


def backbone_state(state: dict) -> dict[str, Tensor]:
    """The backbone's weights in what a weights file (not a run's) holds: a state dict, or one
    under ``state_dict`` / ``model`` (as many training scripts write; a SparK model's gives its
    encoder's), or a released ``_timm_style.pth`` (ConvNeXt keys renamed to timm's)."""
    for entry in ("model", "state_dict"):
        if isinstance(state.get(entry), dict):
            inner = state[entry]
            return encoder_weights(inner) if any(k.startswith(ENCODER_PREFIX) for k in inner) else inner
    return reference_encoder(state)
