"""``sparkmim evaluate segment``: the data layouts, the loss and metric against oracles, the
nnU-Net network fed the encoder the export holds, seeds, and a small run that learns."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nets3d import write_plans
from sparkmim.backbones import create_backbone
from sparkmim.data import DataError
from sparkmim.eval import EvalConfig
from sparkmim.eval.segment import build_network, dice_ce_loss, dice_per_class, find_cases, segment
from sparkmim.modality import IMAGES
from sparkmim.weights import save_encoder_weights


def _pairs(root, count=6, size=64, seed=0, mask_dir="labels"):
    """Images with a bright square (label 1) and a bright disc (label 2) on noise."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / mask_dir).mkdir()
    for i in range(count):
        img = rng.normal(0.3, 0.05, (size, size)).clip(0, 1)
        lab = np.zeros((size, size), np.uint8)
        q = size // 8  # a square of side 2q in the upper-left quarter, a disc of radius q in the lower right
        y, x = rng.integers(1, size // 2 - 2 * q, 2)
        lab[y:y + 2 * q, x:x + 2 * q] = 1
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 2 + q, size - q, 2)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < q * q] = 2
        img[lab > 0] = 0.8
        Image.fromarray((img * 255).astype(np.uint8)).convert("RGB").save(root / "images" / f"c{i}.png")
        Image.fromarray(lab).save(root / mask_dir / f"c{i}.png")
    return root


def test_dice_of_a_hand_made_case():
    """Truth: class 1 on 4 pixels, class 2 on 2; prediction: class 1 on 3 of those 4 and 1 more,
    class 2 nowhere, class 3 in neither (NaN)."""
    truth = torch.zeros(4, 4, dtype=torch.long)
    truth[0, :4] = 1
    truth[3, :2] = 2
    pred = torch.zeros(4, 4, dtype=torch.long)
    pred[0, :3] = 1
    pred[1, 0] = 1
    d = dice_per_class(pred, truth, 4)
    assert d[0] == pytest.approx(2 * 3 / (4 + 4)) and d[1] == 0.0 and np.isnan(d[2])


def test_dice_ce_loss_equals_monais():
    """Cross-entropy plus batch soft Dice of the foreground classes: MONAI's DiceCELoss with the
    same settings is the oracle."""
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 5, 6, 7))
    theirs = monai_losses.DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                                     smooth_nr=1e-5, smooth_dr=1e-5)(logits, target[:, None])
    assert torch.allclose(dice_ce_loss(logits, target), theirs, rtol=1e-10, atol=1e-12)


def test_pairs_are_found_and_a_label_map_of_another_shape_is_refused_naming_both(tmp_path):
    root = _pairs(tmp_path / "d", count=3, mask_dir="masks")
    cases = find_cases(root, IMAGES)
    assert [c[0] for c in cases] == ["c0", "c1", "c2"] and all(c[2].parent.name == "masks" for c in cases)
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(root / "masks" / "c1.png")
    cfg = EvalConfig(mode="segment", data=str(root), model="resnet10t", input_size=64, steps=1, out=str(tmp_path / "o"),
                     progress=False, workers=0, device="cpu")
    with pytest.raises(DataError, match=r"label map .*c1.png is \(32, 64\), its image .*c1.png is \(64, 64\)"):
        segment(cfg, torch.device("cpu"))
    (root / "images" / "c3.png").write_bytes((root / "images" / "c0.png").read_bytes())
    with pytest.raises(DataError, match="have no label map of the same name.*c3.png"):
        find_cases(root, IMAGES)


def _small_run(tmp_path):
    root = _pairs(tmp_path / "d", count=8)
    return dict(mode="segment", data=str(root), model="resnet10t", input_size=64, batch_size=4, lr=3e-3,
                val_fraction=0.25, progress=False, workers=0, device="cpu")


def test_seeds_are_reproducible(tmp_path):
    """resnet10t with the light U-Net decoder: the same seed gives the same losses and Dice,
    another seed others."""
    common = _small_run(tmp_path)
    rows = segment(EvalConfig(**common, steps=3, seeds="0,0,1", out=str(tmp_path / "r")), torch.device("cpu"))["results"]
    assert [r["seed"] for r in rows] == [0, 0, 1]
    assert rows[0]["dice_per_class"] == rows[1]["dice_per_class"] and rows[0]["loss_per_step"] == rows[1]["loss_per_step"]
    assert rows[2]["loss_per_step"] != rows[0]["loss_per_step"]


@pytest.mark.slow  # 20 s of training
def test_a_small_run_learns(tmp_path):
    """80 steps on squares and discs reach a Dice far above chance on held-out images."""
    res = segment(EvalConfig(**_small_run(tmp_path), steps=80, seeds="0", out=str(tmp_path / "o")), torch.device("cpu"))
    assert all(r["dice"] > 0.5 for r in res["results"]), [r["dice"] for r in res["results"]]  # chance: about 0.1
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["summary"][0]["seeds"] == 1 and (tmp_path / "o" / "slices-random.png").is_file()


def test_the_nnunet_network_gets_the_encoder_the_nnunet_export_holds(tmp_path):
    """nnU-Net's own loader puts the export into the network nnU-Net builds; the network
    ``evaluate segment`` builds from the same encoder file has the same encoder, also where the
    decoder holds it; its decoder and segmentation head are nnU-Net's initialisation."""
    pytest.importorskip("dynamic_network_architectures")
    pytest.importorskip("batchgenerators")
    loader = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    from sparkmim.nnunet import nnunet_checkpoint

    plans = write_plans(tmp_path / "nnUNetPlans.json", "anisotropic")
    trained = create_backbone(f"nnunet:{plans}", in_chans=1)
    with torch.no_grad():
        for v in trained.encoder.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v))
    file = save_encoder_weights(trained, tmp_path / "encoder.safetensors", f"nnunet:{plans}")
    nnunet_checkpoint(trained.state_dict(), plans, "3d_fullres", 1, tmp_path / "export.pth")
    cfg = EvalConfig(mode="segment", model=f"nnunet:{plans}", in_chans=1, progress=False)
    ours, report = build_network(cfg, str(file), 0, 3)
    fresh, _ = build_network(cfg, "random", 0, 3)
    theirs, _ = build_network(cfg, "random", 1, 3)
    loader.load_pretrained_weights(theirs, str(tmp_path / "export.pth"))
    a, b, init = ours.state_dict(), theirs.state_dict(), fresh.state_dict()
    assert report["keys_matched"] > 0 and list(a) == list(b)
    encoder = [k for k in a if k.startswith(("encoder.", "decoder.encoder."))]
    assert encoder and all(torch.equal(a[k], b[k]) for k in encoder)
    assert all(torch.equal(a[k], init[k]) for k in a if k not in encoder)
    mine = trained.encoder.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in ours.encoder.state_dict().items())
    assert ours.decoder.seg_layers[-1].weight.shape[0] == 3


def test_evaluate_takes_channels_from_the_run_of_the_same_model_else_from_the_data_set(tmp_path, monkeypatch):
    """``evaluate`` without --in-chans: a run of the model given with --model gives its channels
    and crop (config.yaml); a run of another model gives none; then an nnU-Net dataset's
    ``channel_names`` give the channels."""
    import yaml

    import sparkmim.eval.run
    from sparkmim.cli import main

    seen = []
    monkeypatch.setattr(sparkmim.eval.run, "evaluate", seen.append)
    data = tmp_path / "Dataset001_X"
    (data / "imagesTr").mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T1c"},
                                                   "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "nnunet:a.json", "in_chans": 2, "input_size": 48}))
    base = ["evaluate", "segment", "--data", str(data), "--weights", f"random,spark={run}", "--out", str(tmp_path / "o")]
    assert main([*base, "--model", "nnunet:a.json"]) == 0
    assert main([*base, "--model", "nnunet:b.json"]) == 0
    assert main([*base, "--model", "nnunet:b.json", "--in-chans", "1"]) == 0
    assert [(c.in_chans, c.input_size) for c in seen] == [(2, 48), (4, EvalConfig.input_size), (1, EvalConfig.input_size)]
