"""Weight files: the encoder weights with the original model's keys (safetensors or torch
files, a timm model folder), what an export writes, key reports, torch files read as plain data,
and the one atomic writer every file of sparkmim goes through. (Training checkpoints:
:mod:`sparkmim.checkpoint`.)"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["KeyMismatchError", "WriteError", "CheckpointError", "UnsafeFileError", "load_plain", "ENCODER_PREFIX",
           "atomic_write", "state_bytes", "save_encoder_weights", "read_file", "read_weights", "weights_architecture",
           "key_report", "mismatches",
           "mismatch_message", "load_encoder_weights", "encoder_weights", "is_timm_model", "export_paths",
           "export_backbone", "save_timm_folder"]

# where SparK keeps the user's model: its parameters in a checkpoint are "encoder.model.<original key>"
ENCODER_PREFIX = "encoder.model."


class KeyMismatchError(ValueError):
    """Weights whose keys or shapes do not match the target model."""


class WriteError(OSError):
    """A file could not be written (disk full, no permission); nothing partial was left behind."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def state_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its file."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], expected_bytes: int = 0) -> Path:
    """Write ``path`` through ``write(tmp)`` on a temporary file beside it, flushed to disk,
    given the usual permissions (0666 less the umask), then renamed over ``path``: a reader sees
    the old file or the new one, never a partial one. On failure (disk full, no permission) the
    temporary file is removed and :class:`WriteError` names the path, the bytes needed and the
    bytes free."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        tmp.replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(_write_failure(path, e, expected_bytes)) from e
    return path


def _write_failure(path: Path, error: Exception, expected_bytes: int) -> str:
    """Why ``path`` could not be written: a full disk (or a file-size limit) with the space needed
    and free; the folder gone; or the error as the system gave it."""
    import errno

    reason = " ".join(str(error).split()) or type(error).__name__
    short_write = isinstance(error, RuntimeError) and "inline_container" in reason  # torch.save's report
    if short_write or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "free space unknown"
        need = f"about {expected_bytes / 2**20:,.1f} MiB needed, " if expected_bytes else ""
        if short_write:
            reason = f"the write stopped part-way: the disk is full or a file-size limit was reached ({reason})"
        return f"could not write {path} ({need}{free}): {reason}"
    if not path.parent.is_dir():
        return f"could not write {path}: the folder {path.parent} no longer exists (was it moved or deleted?)"
    return f"could not write {path}: {reason}"


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage or are not contiguous
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_encoder_weights(model: nn.Module | dict[str, Tensor], path: str | Path, architecture: str | None = None) -> Path:
    """Write the weights of the original model (``.safetensors``, or ``.pth`` / ``.pt`` via
    torch.save) with :func:`atomic_write`. ``model`` is the backbone, a ``SparseEncoder`` (its
    ``.model`` is written), or a state dict; ``architecture``, its ``--model`` name, is recorded
    in a ``.safetensors`` file's metadata (:func:`weights_architecture`)."""
    if hasattr(model, "sparse_impl") and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a SparseEncoder: the user's model it runs
    path = Path(path)
    state = _plain(model if isinstance(model, dict) else model.state_dict())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt", **({"sparkmim_model": architecture} if architecture else {})}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), state_bytes(state))
    return atomic_write(path, lambda tmp: torch.save(state, tmp), state_bytes(state))


def weights_architecture(path: str | Path) -> str | None:
    """The ``--model`` a weights file was exported from, where it can be told: recorded in a
    sparkmim ``.safetensors`` export, or in the ``config.yaml`` of the run folder that holds the
    file; else None."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                found = (f.metadata() or {}).get("sparkmim_model")
            if found:
                return found
        except Exception:  # not readable: the reader of the weights says why
            pass
    config = path.parent / "config.yaml"
    if config.is_file():
        import yaml

        try:
            saved = yaml.safe_load(config.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return saved.get("model") if isinstance(saved, dict) and isinstance(saved.get("model"), str) else None
    return None


class UnsafeFileError(CheckpointError):
    """A torch file that holds more than plain data (Python objects whose loading runs code)."""


def load_plain(path: str | Path, what: str = "file") -> object:
    """``torch.load`` of plain data only (tensors, numbers, strings, containers; nothing in the
    file runs). A file holding other Python objects is refused with :class:`UnsafeFileError`,
    one that cannot be read with :class:`CheckpointError`, each naming the file as ``what``."""
    import pickle
    import re

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a Python object the plain-data loader refuses to build
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        holds = f" (it names {found.group(1)})" if found else ""
        raise UnsafeFileError(
            f"{what} {path} holds Python objects besides tensors, numbers and strings{holds}, so it is refused: "
            f"loading it could run code. Where it was made, save plain data instead: "
            f"torch.save(model.state_dict(), FILE) or safetensors.torch.save_file(model.state_dict(), FILE)") from e
    except Exception as e:  # truncated zip, wrong format: name the file, not the reader
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise CheckpointError(f"cannot read {what} {path}: {reason}") from e


def read_file(path: str | Path) -> object:
    """What a weights file holds: the state dict of a ``.safetensors`` file, or a plain-data torch
    file's object."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        try:
            return load_file(str(path))
        except Exception as e:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read weights file {path}: {' '.join(str(e).split())[:300]}") from e
    return load_plain(path, "weights file")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The backbone's weights in whatever ``path`` is (:func:`sparkmim.sources.read_source`)."""
    from .sources import backbone_weights_of  # the reader of user files stands above this module

    return backbone_weights_of(path)


def key_report(model: nn.Module, state: dict[str, Tensor]) -> dict[str, list[str]]:
    """Keys missing from ``state``, unexpected in it, and present with a different shape."""
    own = model.state_dict()
    return {
        "matched": sorted(k for k in own if k in state and tuple(own[k].shape) == tuple(state[k].shape)),
        "missing": sorted(k for k in own if k not in state),
        "unexpected": sorted(k for k in state if k not in own),
        "shape_mismatch": sorted(
            f"{k}: model {tuple(own[k].shape)} vs file {tuple(state[k].shape)}"
            for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)
        ),
    }


def load_encoder_weights(model: nn.Module, path_or_state, *, strict: bool = True) -> dict[str, list[str]]:
    """Load weights into ``model``; with ``strict`` any mismatch raises a readable report."""
    state = path_or_state if isinstance(path_or_state, dict) else read_weights(path_or_state)
    report = key_report(model, state)
    if strict and mismatches(report):
        raise KeyMismatchError(mismatch_message("weights do not match the model", report))
    if strict:
        model.load_state_dict(state, strict=True)
    else:
        model.load_state_dict({k: state[k] for k in report["matched"]}, strict=False)
    return report


def mismatches(report: dict[str, list[str]]) -> dict[str, list[str]]:
    """The non-empty problem lists of a :func:`key_report` (missing, unexpected, shape mismatch)."""
    return {k: v for k, v in report.items() if k in ("missing", "unexpected", "shape_mismatch") and v}


def mismatch_message(title: str, report: dict[str, list[str]]) -> str:
    lines = [f"{k} ({len(v)}): {', '.join(v[:8])}{' ...' if len(v) > 8 else ''}" for k, v in mismatches(report).items()]
    return title + ":\n  " + "\n  ".join(lines)


def encoder_weights(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights, with its own keys, out of a SparK state dict (a checkpoint's ``model``)."""
    return {k[len(ENCODER_PREFIX):]: v for k, v in model_state.items() if k.startswith(ENCODER_PREFIX)}


def is_timm_model(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm model (it carries timm's ``pretrained_cfg``)."""
    return isinstance(getattr(backbone, "pretrained_cfg", None), dict)


def export_paths(backbone: nn.Module, out: str | Path) -> list[Path]:
    """What :func:`export_backbone` writes: the weights file ``out`` and, for a timm backbone, the
    timm model folder ``timm/`` beside it."""
    out = Path(out)
    return [out, out.parent / "timm"] if is_timm_model(backbone) else [out]


def export_backbone(backbone: nn.Module, out: str | Path, *, mean, std, input_size: int,
                    architecture: str | None = None) -> Path | None:
    """Export a pre-trained backbone: its weights with the original model's keys to ``out``
    (``.safetensors`` or a torch file) and, for a timm backbone, a timm model folder ``timm/``
    beside it (:func:`save_timm_folder`, with the run's normalisation and input size). Returns the
    timm folder, or None. The end of a run and ``sparkmim export`` both write through here;
    ``architecture`` (the ``--model`` name) is recorded in a ``.safetensors`` file."""
    out = Path(out)
    save_encoder_weights(backbone, out, architecture)
    if not is_timm_model(backbone):
        return None
    return save_timm_folder(backbone, out.parent / "timm", mean=mean, std=std, input_size=input_size)


def save_timm_folder(backbone: nn.Module, folder: str | Path, *, mean, std, input_size: int) -> Path:
    """Write a timm backbone as a timm model folder: ``model.safetensors`` and ``config.json``
    (architecture, constructor arguments, and a ``pretrained_cfg`` with the run's normalisation and
    input size), written by timm itself; ``timm.create_model("local-dir:FOLDER", pretrained=True)``
    loads it (``num_classes=N`` adds a fresh head), and the folder can be uploaded to a model hub
    as it is."""
    from timm.models import save_for_hf

    if not is_timm_model(backbone):
        raise ValueError(f"{type(backbone).__name__} is not a timm model; write its weights with save_encoder_weights")
    folder = Path(folder)
    cfg = {k: v for k, v in backbone.pretrained_cfg.items() if k not in ("url", "hf_hub_id", "file", "state_dict")}
    cfg.update(tag="sparkmim", mean=tuple(mean), std=tuple(std), num_classes=0, license=None, origin_url=None,
               paper_ids=None, input_size=(len(mean), input_size, input_size), test_input_size=None,
               notes="SparK masked image modeling pre-training with sparkmim")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    original, backbone.pretrained_cfg = backbone.pretrained_cfg, cfg
    staging = folder.with_name(folder.name + ".tmp")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        save_for_hf(backbone, str(staging), model_args={"num_classes": 0, "in_chans": len(mean)},
                    safe_serialization=True)
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteError(f"could not write the timm model folder {folder}: {e}") from e
    finally:
        backbone.pretrained_cfg = original
    return folder
