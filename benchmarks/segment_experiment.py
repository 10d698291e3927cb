"""Does SparK pre-training help 3-D segmentation with few labels? A CPU-sized experiment.

1. Generate the task (benchmarks/seg_shapes.py): tubes (label 1) among blobs and plates of the
   same intensity in textured, noisy 64^3 volumes; unlabelled volumes for pre-training, labelled
   ones for fine-tuning, a fixed validation set.
2. Pre-train a narrow nnU-Net ResEnc (plans file written here: 4 stages, widths 8-64, total stride
   8, so a 32^3 crop is a 4 x 4 x 4 mask grid) with SparK: hierarchical, single-scale
   (``--hierarchical false``) and zero-out masking (``--sparse false``).
3. ``sparkmim evaluate segment`` per label count and seed, sources random and the three runs.

``--model monai:resnet10 --crop 64`` does the same for a MONAI ResNet-10 (total stride 16, so a
64^3 crop is a 4 x 4 x 4 grid) with sparkmim's light U-Net decoder, under WORK/runs/resnet10-*
and WORK/resnet10-eval/.

    python benchmarks/segment_experiment.py --work /tmp/segexp --labels 4,8,16,32 --seeds 0,1,2

Each step is skipped when its output exists, so a rerun continues. JSON lines; every
``results.json`` stays under WORK/eval/. ``--steps`` (fine-tuning) and ``--epochs``
(pre-training) size the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plans(path: Path) -> Path:
    """A narrow residual-encoder plans file in nnU-Net 2.4+'s layout."""
    n = 4
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": [8, 16, 32, 64],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                            "n_blocks_per_stage": [1, 2, 2, 2], "n_conv_per_stage_decoder": [1] * (n - 1),
                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    data = {"dataset_name": "Dataset900_Shapes", "plans_name": "nnUNetResEncNarrow",
            "configurations": {"3d_fullres": {"data_identifier": "narrow_3d_fullres", "batch_size": 2,
                                              "patch_size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0],
                                              "architecture": arch}},
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]}
    path.write_text(json.dumps(data, indent=1))
    return path


def run(cmd: list[str], log: Path) -> None:
    print(json.dumps({"event": "run", "cmd": " ".join(cmd)}), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/segexp")
    p.add_argument("--unlabelled", type=int, default=200)
    p.add_argument("--labels", default="4,8,16,32")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=40, help="pre-training epochs over the unlabelled volumes")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    p.add_argument("--lr", default="1e-3", help="pre-training peak lr (the demos' value; base_lr x 8 / 256 is far too low)")
    p.add_argument("--variants", default="spark,single,zeroout")
    p.add_argument("--model", default="nnunet", help="nnunet (the narrow ResEnc of WORK/plans.json) or another 3-D "
                   "backbone with the light decoder, e.g. monai:resnet10 (total stride 16: use --crop 64)")
    p.add_argument("--crop", type=int, default=32, help="crop side for pre-training and fine-tuning (the mask grid is "
                   "crop / total stride per axis)")
    p.add_argument("--decoder-width", type=int, default=64, help="SparK's decoder, and the segmentation decoder of "
                   "a backbone that is not nnU-Net's")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--table", action="store_true", help="print the Dice table of WORK's results (markdown) and stop")
    a = p.parse_args(argv)
    if a.table:
        return print(table(Path(a.work)))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    top = max(int(v) for v in a.labels.split(","))
    if not (data / "val" / "dataset.json").is_file():
        run([sys.executable, str(HERE / "seg_shapes.py"), "--out", str(data), "--size", "64", "--unlabelled",
             str(a.unlabelled), "--labelled", str(top), "--val", "16"], work / "generate.log")
    nnunet = a.model == "nnunet"
    model = f"nnunet:{plans(work / 'plans.json')}" if nnunet else a.model
    tag = "" if nnunet else a.model.split(":")[-1] + "-"  # the narrow ResEnc keeps the first run's paths
    crop = ["--input-size", str(a.crop)]
    variants = {"spark": [], "single": ["--hierarchical", "false"], "zeroout": ["--sparse", "false"]}
    runs = {}
    for name in a.variants.split(","):
        out = work / "runs" / f"{tag}{name}"
        runs[name] = out
        if not (out / "encoder.safetensors").is_file():
            run(["sparkmim", "pretrain", "--data", str(data / "unlabelled"), "--model", model, "--in-chans", "1",
                 *crop, "--batch-size", "8", "--lr", a.lr, "--epochs", str(a.epochs), "--warmup-epochs",
                 str(max(1, a.epochs // 10)), "--decoder-width", str(a.decoder_width), "--workers", "2", "--device", a.device,
                 "--vis-every-epochs", "0", "--progress", "false", "--tensorboard", "false", "--out", str(out),
                 *variants[name]], work / f"pretrain-{tag}{name}.log")
    sources = {"random": "random", **{n: f"{n}={runs[n]}" for n in runs}}
    evals = work / (f"{tag}eval" if a.steps == 100 else f"{tag}eval-steps{a.steps}")  # one folder per schedule
    for labels in (int(v) for v in a.labels.split(",")):
        have = _done_sources(evals, labels)
        missing = [name for name in sources if name not in have]
        if not missing:
            continue
        out = evals / f"labels-{labels}-{'-'.join(missing)}"
        run(["sparkmim", "evaluate", "segment", "--data", str(data / "train"), "--val", str(data / "val"),
             "--model", model, "--in-chans", "1", *crop, "--labels", str(labels), "--seeds", a.seeds,
             *([] if nnunet else ["--decoder-width", str(a.decoder_width)]),
             "--steps", str(a.steps), "--weights", ",".join(sources[n] for n in missing), "--workers", "0",
             "--device", a.device, "--progress", "false", "--out", str(out)], work / f"{evals.name}-{out.name}.log")
        (out / "done").write_text("")
        res = json.loads((out / "results.json").read_text())
        for s in res["summary"]:
            print(json.dumps({"event": "result", "labels": labels, **s}), flush=True)


def table(work: Path) -> str:
    """Mean foreground Dice (%) per network, label count and source: per seed; mean +- sample s.d."""
    order = ["random", "spark", "single", "zeroout"]
    lines = ["| network | labelled | " + " | ".join(order) + " |", "|---|---|" + "---|" * len(order)]
    for root in sorted(work.glob("*eval*")):
        if not root.is_dir():
            continue
        found: dict[int, dict[str, dict]] = {}
        for res in root.glob("labels-*/results.json"):
            data = json.loads(res.read_text())
            for s in data["summary"]:
                found.setdefault(data["config"]["labels"], {})[s["weights"]] = s
        model, _, steps = root.name.partition("eval")
        network = "narrow nnU-Net ResEnc" if not model else f"monai:{model.removesuffix('-')}"
        network += f", {steps.removeprefix('-steps')} fine-tuning steps" if steps else ""
        for labels in sorted(found):
            cells = []
            for name in order:
                s = found[labels].get(name)
                cells.append("" if s is None else " / ".join(f"{100 * v:.1f}" for v in s["dice_per_seed"])
                             + f"; {100 * s['dice_mean']:.1f} +- {100 * s['dice_std']:.1f}")
            lines.append(f"| {network} | {labels} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _done_sources(root: Path, labels: int) -> set[str]:
    """The weight sources already evaluated at ``labels`` (each source is seeded on its own, so
    a source evaluated in an earlier call gives the same figures as in a later one)."""
    done = set()
    for res in root.glob(f"labels-{labels}*/results.json"):
        if (res.parent / "done").is_file() and json.loads(res.read_text())["config"]["labels"] == labels:
            done.update(s["weights"] for s in json.loads(res.read_text())["summary"])
    return done

if __name__ == "__main__":
    main()
