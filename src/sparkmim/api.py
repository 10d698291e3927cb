"""``sparkmim.pretrain(...)``: the command line's pre-training in one Python call."""

from __future__ import annotations

__all__ = ["pretrain"]


def pretrain(data: str | None = None, *, config: str | None = None, **options) -> dict:
    """Pre-train with SparK as ``sparkmim pretrain`` does and return the run's summary (the
    dictionary its last line prints).

    ``data`` is an image folder or a text file of paths (None: the demo photographs); ``config`` a
    built-in recipe name (``demo``, ``resnet50``, ``convnext_small``, ``one_gpu``) or a YAML file;
    ``options`` are the command's flags with underscores, e.g. ``model="resnet18", epochs=10,
    batch_size=64, out="runs/r18"``. They are checked as the command checks them
    (:class:`~sparkmim.config.ConfigError` says what is wrong)."""
    from .config import load_config, recipe_path
    from .train import pretrain as run

    return run(load_config(recipe_path(config), {"data": data, **options}))
