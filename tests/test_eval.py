"""sparkmim evaluate: k-NN voting, the seeded split, weight sources, the three modes from the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sparkmim.cli import main
from sparkmim.eval import (
    EvalConfig,
    PooledClassifier,
    build_classifier,
    knn_accuracy,
    layer_decay_groups,
    split_samples,
)
from sparkmim.weights import save_encoder_weights

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Three classes told apart by colour only: 10 noisy images each."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(10):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0], [-0.05, 1.0]])
    train_y = torch.tensor([1, 0, 0, 0])
    val_f = torch.tensor([[1.0, 0.25]])  # nearest: the class-1 sample; 3 class-0 samples further away
    weighted = knn_accuracy(train_f, train_y, val_f, torch.tensor([1]), [1, 4], temperature=0.07, num_classes=2)
    assert weighted == {1: 100.0, 4: 100.0}  # exp(0.97/0.07) outweighs 3 x exp(~0.29/0.07)
    flat = knn_accuracy(train_f, train_y, val_f, torch.tensor([1]), [4], temperature=100.0, num_classes=2)
    assert flat == {4: 0.0}  # nearly equal weights: the majority (class 0) wins


def test_split_is_stratified_seeded_and_disjoint():
    samples = [(f"{c}/{i}", c) for c in range(3) for i in range(10)]
    kept, held = split_samples(samples, 0.2, seed=1)
    assert sorted(kept + held) == sorted(samples)
    assert [sum(1 for _, c in held if c == k) for k in range(3)] == [2, 2, 2]
    assert split_samples(samples, 0.2, seed=1) == (kept, held)
    assert split_samples(samples, 0.2, seed=2)[1] != held


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        EvalConfig(mode="svm")
    with pytest.raises(ValueError, match="k must be"):
        EvalConfig(k="0,x")
    assert EvalConfig().stages(4) == [4] and EvalConfig(stage="all").stages(3) == [1, 2, 3]
    assert EvalConfig(stage="2, 4").stages(4) == [2, 4]
    with pytest.raises(ValueError, match="stage must be 'last', 'all' or stage numbers from 1 to 4"):
        EvalConfig(stage="5").stages(4)
    assert EvalConfig(weights="random, mine=runs/a").sources == [("random", "random"), ("mine", "runs/a")]


def _run(capsys, *args):
    code = main(["evaluate", *map(str, args)])
    return code, capsys.readouterr()


COMMON = ("--model", "resnet10t", "--input-size", "32", "--crop-ratio", "1", "--workers", "0", "--progress", "false",
          "--val-fraction", "0.3", "--batch-size", "8")


def test_knn_and_linear_from_the_cli_compare_weight_sources(colours, tmp_path, capsys):
    import timm

    torch.manual_seed(5)  # the random init that --seed 5 gives, exported like sparkmim export does
    exported = save_encoder_weights(timm.create_model("resnet10t", num_classes=0), tmp_path / "enc.safetensors")
    code, out = _run(capsys, "knn", "--data", colours, *COMMON, "--seed", 5, "--k", "1,5",
                     "--weights", f"random,mine={exported}", "--out", tmp_path / "knn")
    assert code == 0, out.err
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert res["train_images"] == 21 and res["val_images"] == 9 and res["classes"] == sorted(COLOURS)
    rows = {r["weights"]: r for r in res["results"]}
    assert rows["mine"]["keys_matched"] > 0
    # same weights through both paths: identical accuracies; colour classes are separable
    assert rows["mine"]["top1_k5"] == rows["random"]["top1_k5"] >= 88.0
    assert "knn top-1 (%)" in out.out and "mine" in out.out  # the terminal table

    code, out = _run(capsys, "linear", "--data", colours, *COMMON, "--epochs", 30, "--lr", "0.01",
                     "--weights", "random", "--out", tmp_path / "linear")
    assert code == 0, out.err
    row = json.loads((tmp_path / "linear" / "results.json").read_text())["results"][0]
    assert len(row["top1_per_epoch"]) == 30 and row["top1"] >= 88.0


def test_finetune_from_the_cli_learns_the_classes_and_reports_every_epoch(colours, tmp_path, capsys):
    """Colour classes are separable: fine-tuning a random backbone (with mixup and cutmix on) ends
    far above chance (33 %), and every epoch is reported."""
    code, out = _run(capsys, "finetune", "--data", colours, *COMMON, "--epochs", 4, "--mixup", 0.2, "--cutmix", 1.0,
                     "--lr", "0.01", "--weights", "random", "--out", tmp_path / "ft")
    assert code == 0, out.err
    row = json.loads((tmp_path / "ft" / "results.json").read_text())["results"][0]
    epochs = [json.loads(line) for line in out.out.splitlines() if line.startswith('{"event": "epoch"')]
    assert [e["top1"] for e in epochs] == row["top1_per_epoch"] and len(epochs) == 4
    assert row["best_top1"] >= 77.0, row["top1_per_epoch"]


def test_evaluate_builds_the_backbone_with_the_files_weights(tmp_path):
    """The backbone a --weights FILE is evaluated with holds the file's tensors (exported from the
    seed-5 init), not the init of the evaluation's own seed (6)."""
    import timm
    from safetensors.torch import load_file

    from sparkmim.eval.run import build_backbone

    torch.manual_seed(5)
    path = save_encoder_weights(timm.create_model("resnet10t", num_classes=0), tmp_path / "w.safetensors")
    backbone, report = build_backbone(EvalConfig(model="resnet10t"), str(path), seed=6)
    own, saved = backbone.state_dict(), load_file(path)
    assert report["matched"] == len(own) == len(saved)
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    random, _ = build_backbone(EvalConfig(model="resnet10t"), "random", seed=6)
    assert not torch.equal(random.state_dict()["conv1.0.weight"], saved["conv1.0.weight"])


def test_weights_of_another_model_are_refused(colours, tmp_path, capsys):
    import timm

    other = save_encoder_weights(timm.create_model("resnet18", num_classes=0), tmp_path / "r18.safetensors")
    code, out = _run(capsys, "knn", "--data", colours, *COMMON, "--weights", other, "--out", tmp_path / "x")
    assert code == 2 and "do not match" in out.err


def test_finetune_heads_keep_the_backbone_weights_and_decay_lr_by_depth():
    import timm
    import torchvision

    backbone = timm.create_model("resnet10t", num_classes=0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    clf = build_classifier(backbone, 4)
    assert clf.get_classifier().out_features == 4
    after = clf.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    groups = layer_decay_groups(clf, 0.05, 0.5)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(clf.conv1[0].weight)] < scales[id(clf.layer4[0].conv1.weight)] < scales[id(clf.fc.weight)] == 1.0

    tv = PooledClassifier(torchvision.models.resnet18(), 4)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    groups = layer_decay_groups(tv, 0.05, 0.5)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    m = tv.encoder.model
    assert scales[id(m.conv1.weight)] < scales[id(m.layer4[0].conv1.weight)] < scales[id(tv.fc.weight)] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))


def test_every_stage_is_probed_with_its_own_pooled_features(colours, tmp_path, capsys):
    """``--stage all``: a row per feature map, each the k-NN of that stage's pooled features (the
    last stage's row equals the default evaluation's)."""
    code, out = _run(capsys, "knn", "--data", colours, *COMMON, "--k", "3", "--stage", "all", "--out", tmp_path / "all")
    assert code == 0, out.err
    rows = json.loads((tmp_path / "all" / "results.json").read_text())["results"]
    assert [r["stage"] for r in rows] == [1, 2, 3, 4] and "stage" in out.out
    code, out = _run(capsys, "knn", "--data", colours, *COMMON, "--k", "3", "--out", tmp_path / "last")
    last = json.loads((tmp_path / "last" / "results.json").read_text())["results"]
    assert len(last) == 1 and last[0]["top1_k3"] == rows[-1]["top1_k3"]

    import timm

    from sparkmim.encoder import SparseEncoder
    from sparkmim.eval.probes import extract_features

    encoder = SparseEncoder(timm.create_model("resnet10t", num_classes=0), check=False)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 2])
    feats, labels = extract_features(encoder, [(x, y)], torch.device("cpu"), False, "")
    with torch.no_grad():
        maps = encoder.eval()(x)
    assert len(feats) == 4 and torch.equal(labels, y)
    for f, m in zip(feats, maps):
        torch.testing.assert_close(f, m.mean(dim=(2, 3)))


def test_bn_stats_data_estimates_the_running_statistics_from_the_training_images(colours, tmp_path, capsys):
    """Weights whose BatchNorm running statistics are wrong (as after training on other inputs):
    with the saved statistics the colour classes are lost; ``--bn-stats data`` estimates them
    from the training images and gives the same accuracy as the correct statistics."""
    import timm

    torch.manual_seed(5)
    model = timm.create_model("resnet10t", num_classes=0)
    good = save_encoder_weights(model, tmp_path / "good.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("running_mean"):
            state[k] += 50.0
    bad = save_encoder_weights(state, tmp_path / "bad.safetensors")
    accs = {}
    for bn in ("saved", "data"):
        code, out = _run(capsys, "knn", "--data", colours, *COMMON, "--k", "5", "--bn-stats", bn,
                         "--weights", f"good={good},bad={bad}", "--out", tmp_path / bn)
        assert code == 0, out.err
        for row in json.loads((tmp_path / bn / "results.json").read_text())["results"]:
            accs[row["weights"], bn] = row["top1_k5"]
    assert accs["bad", "saved"] < accs["good", "saved"] - 30  # the wrong statistics spoil the features
    assert accs["bad", "data"] == accs["good", "data"] >= 88.0  # estimated again, they do not
