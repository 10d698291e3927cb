"""The one reader of user files (sparkmim.sources): each kind of file or folder a user hands to
--init, --resume, export, reconstruct or evaluate --weights is read as exactly one kind, gives the
weights that were written into it, and an entry point refuses a kind it cannot use, saying what the
file is."""

import ast
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from sparkmim.checkpoint import RunCheckpoint, RunState
from sparkmim.cli import main
from sparkmim.config import PretrainConfig
from sparkmim.modality import modality_for
from sparkmim.sources import EncoderWeights, ReleasedRun, RunFolder, kind_of, read_source
from sparkmim.train.setup import build_model
from sparkmim.weights import ENCODER_PREFIX, UnsafeFileError, save_encoder_weights

SRC = Path(__file__).parents[1] / "src" / "sparkmim"


def _weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=0).state_dict()


def _checkpoint_state(encoder: dict) -> dict:
    """A training checkpoint laid out as every sparkmim version wrote it (a written-out dict, not
    one made by the code under test)."""
    return {"model": {ENCODER_PREFIX + k: v for k, v in encoder.items()} | {"decoder.head.weight": torch.ones(2)},
            "optimizer": {"state": {}, "param_groups": []}, "scaler": {}, "window": None,
            "epoch": 1, "batch": 0, "step": 3, "images_seen": 12, "bad_images": 0, "bad_files": {},
            "first_loss": 1.0, "loss_last": 0.9, "world": 1,
            "config": {"model": "resnet10t", "in_chans": 3, "input_size": 64, "batch_size": 4},
            "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths, expected = {}, {}
    run = root / "run"
    run.mkdir()
    expected["run"] = expected["checkpoint"] = expected["renamed checkpoint"] = _weights(1)
    torch.save(_checkpoint_state(expected["run"]), run / "checkpoint-00000003.pth")
    torch.save(_checkpoint_state(expected["run"]), root / "kept-for-later.pth")
    paths |= {"run": run, "checkpoint": run / "checkpoint-00000003.pth", "renamed checkpoint": root / "kept-for-later.pth"}
    expected["export"] = _weights(2)
    paths["export"] = save_encoder_weights(expected["export"], root / "encoder.safetensors", architecture="resnet10t")
    expected["state_dict entry"] = _weights(3)
    paths["state_dict entry"] = root / "trained.pth"
    torch.save({"state_dict": expected["state_dict entry"], "epoch": 7}, paths["state_dict entry"])
    expected["released"] = _weights(4)
    paths["released"] = root / "resnet10t_withdecoder_spark_style.pth"
    torch.save({"arch": "resnet10t", "epoch": 9, "input_size": 224,
                "module": {f"sparse_encoder.sp_cnn.{k}": v for k, v in expected["released"].items()}},
               paths["released"])
    return paths, expected


KINDS = {"run": RunFolder, "checkpoint": RunCheckpoint, "renamed checkpoint": RunCheckpoint, "export": EncoderWeights,
         "state_dict entry": EncoderWeights, "released": ReleasedRun}


@pytest.mark.parametrize("name", list(KINDS))
def test_each_user_file_is_read_as_one_kind_with_the_weights_written_into_it(files, name):
    paths, expected = files
    source = read_source(paths[name])
    assert type(source) is KINDS[name] and kind_of(source)
    got = source.backbone_weights()
    assert got.keys() == expected[name].keys()
    assert all(torch.equal(got[k], v) for k, v in expected[name].items())
    assert source.architecture == (None if name == "state_dict entry" else "resnet10t")


def test_a_training_checkpoint_reads_back_what_was_written(files):
    paths, _ = files
    checkpoint = read_source(paths["checkpoint"])
    written = _checkpoint_state(_weights(1))
    assert checkpoint.progress == RunState(epoch=1, batch=0, step=3, images_seen=12, first_loss=1.0, last_loss=0.9)
    assert checkpoint.stats() == ([0.5] * 3, [0.25] * 3) and checkpoint.pretrain_config().batch_size == 4
    again = checkpoint.to_state()
    assert again.keys() == written.keys()
    assert all(again[k] == v for k, v in written.items() if k not in ("model",))


def test_what_is_not_a_source_is_refused_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_source(tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="not a sparkmim run folder"):
        read_source(tmp_path)
    pickled = tmp_path / "model.pth"
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a whole module: loading it would run code
    with pytest.raises(UnsafeFileError, match="model.pth"):
        read_source(pickled)
    broken = tmp_path / "broken.safetensors"
    save_file({"w": torch.ones(3)}, str(broken))
    broken.write_bytes(broken.read_bytes()[:20])
    with pytest.raises(ValueError, match="broken.safetensors"):
        read_source(broken)


def test_init_from_a_run_folder_starts_from_its_encoder(files):
    paths, expected = files
    cfg = PretrainConfig(model="resnet10t", init=str(paths["run"]), input_size=64, device="cpu")
    model = build_model(cfg, modality_for(cfg.model))
    own = model.encoder.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in expected["run"].items())


def test_resume_from_encoder_weights_is_refused_pointing_to_init(files, tmp_path, capsys):
    paths, _ = files
    code = main(["pretrain", "--model", "resnet10t", "--input-size", "64", "--batch-size", "2", "--data", "demo",
                 "--demo-length", "4", "--workers", "0", "--device", "cpu", "--progress", "false",
                 "--tensorboard", "false", "--vis-every-epochs", "0", "--out", str(tmp_path / "run"),
                 "--resume", str(paths["export"])])
    err = capsys.readouterr().err
    assert code == 2 and "encoder weights, not a training checkpoint" in err and f"--init {paths['export']}" in err


def test_reconstruct_of_encoder_weights_is_refused_saying_what_they_are(files, capsys):
    paths, _ = files
    code = main(["reconstruct", str(paths["export"]), "image.png", "--out", "grid.png"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a run folder" in err and "is encoder weights" in err


def _deciders_called(tree: ast.AST) -> set[str]:
    """Which of sparkmim's file-kind deciders a module calls (imported from its weights or
    released modules; torchvision's own ``read_file`` of image bytes is another function)."""
    deciders = {"is_spark_style", "read_file"}
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").rsplit(".", 1)[-1] in ("weights", "released")
                for alias in node.names if alias.name in deciders}
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name) and node.func.id in imported}


def test_what_a_user_file_is_is_decided_in_one_place():
    """Whether a file is one of the paper's released runs, and how a weights file is read, is
    decided in sources.py only (released.py reads the released files it is handed)."""
    deciding = {str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                if path.name != "released.py" and _deciders_called(ast.parse(path.read_text()))}
    assert deciding == {"sources.py"}


def test_resume_from_a_run_folder_takes_its_newest_readable_checkpoint(files, tmp_path):
    from sparkmim.checkpoint import CheckpointManager
    from sparkmim.train.folder import resume_checkpoint

    paths, _ = files
    run = tmp_path / "run"
    run.mkdir()
    for step in (3, 6):
        state = _checkpoint_state(_weights(step)) | {"step": step}
        torch.save(state, run / f"checkpoint-{step:08d}.pth")
    (run / "checkpoint-00000009.pth").write_bytes(b"truncated")
    cfg = PretrainConfig(model="resnet10t", resume=str(run), batch_size=4, input_size=64)
    with pytest.warns(UserWarning, match="checkpoint-00000009.pth"):
        found = resume_checkpoint(cfg, CheckpointManager(tmp_path / "elsewhere"), main=True)
    assert found.path == run / "checkpoint-00000006.pth" and found.progress.step == 6
    assert torch.equal(found.backbone_weights()["conv1.0.weight"], _weights(6)["conv1.0.weight"])


def test_a_checkpoint_of_an_older_layout_reads_with_the_defaults_of_its_time(tmp_path):
    """Checkpoints written before bad_files, loss_last, world, window and the normalisation were
    saved: the progress they hold, nothing lost, and the default normalisation of their channels."""
    old = _checkpoint_state(_weights(1))
    for key in ("bad_images", "bad_files", "loss_last", "world", "window", "norm_mean", "norm_std"):
        del old[key]
    torch.save(old, tmp_path / "checkpoint-00000003.pth")
    checkpoint = read_source(tmp_path / "checkpoint-00000003.pth")
    assert checkpoint.progress == RunState(epoch=1, batch=0, step=3, images_seen=12, first_loss=1.0)
    assert checkpoint.window is None and checkpoint.stats() == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_export_of_a_sparkmim_export_takes_the_model_it_records(files, tmp_path, capsys):
    paths, expected = files
    assert main(["export", str(paths["export"]), "--out", str(tmp_path / "again.safetensors")]) == 0
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event["model"] == "resnet10t" and event["kind"] == "encoder weights"
    again = read_source(tmp_path / "again.safetensors").backbone_weights()
    assert all(torch.equal(again[k], v) for k, v in expected["export"].items())
