"""``sparkmim.pretrain(...)``: the command line's pre-training in one Python call."""

from __future__ import annotations

__all__ = ["pretrain"]


def pretrain(data: str | None = None, *, config: str | None = None, **options) -> dict:
    """Pre-train with SparK as ``sparkmim pretrain`` does and return the run's summary (the
    dictionary its last line prints).

    ``data`` is an image folder or a text file of paths (``"demo"``: the demo photographs); it may
    be left out when a recipe names it or the run is resumed (``resume="auto"``: the run in ``out``
    continues with its own settings). ``config`` is a built-in recipe name (``demo``, ``resnet50``,
    ``convnext_small``, ``one_gpu``) or a YAML file; ``options`` are the command's flags with
    underscores, e.g. ``model="resnet18", epochs=10, batch_size=64, out="runs/r18"``. They are
    checked as the command checks them (:class:`~sparkmim.config.ConfigError` says what is wrong)."""
    from .config import config_for_run, recipe_path
    from .train import pretrain as run

    return run(config_for_run(recipe_path(config), {"data": data, **options}))
