"""The hand-off check for benchmarks/segment_experiment.py: the same task through nnU-Net's own trainer.

Takes the experiment's work folder (its data and its SparK run) and:

1. writes an nnU-Net raw dataset (``Dataset900_Shapes``: the first ``--labels`` labelled training
   cases and the 16 validation cases, renamed ``val*``) and a ``splits_final.json`` whose fold 0
   trains on the labelled cases and validates on the validation cases, the experiment's split;
2. runs nnU-Net's fingerprint and ResEnc planner, then replaces the ``3d_fullres`` network and
   patch with the experiment's narrow ResEnc (``WORK/plans.json``: the network SparK pre-trained)
   under the plans name ``nnUNetResEncNarrow``, and preprocesses with it;
3. ``sparkmim export RUN --nnunet PLANS`` for each run, then trains nnU-Net's own trainer from
   random init and from each export, as ``nnUNetv2_train 900 3d_fullres 0 -p nnUNetResEncNarrow
   -device cpu [-pretrained_weights FILE]`` does (the same calls: the trainer, nnU-Net's
   ``load_pretrained_weights``, ``run_training``, ``perform_actual_validation``), with the trainer
   shortened for a CPU (a subclass: ``--epochs`` of ``--iterations`` steps, and no mirroring at
   validation, which costs eight predictions per window);
4. reads nnU-Net's own validation Dice (``fold_0/validation/summary.json``).

    python benchmarks/segment_nnunet.py --work /tmp/segexp --labels 8 --epochs 4 --iterations 50

Needs nnU-Net's training dependencies (batchgeneratorsv2 and the rest, see docs/experiments.md).
JSON lines; each step is skipped when its output exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str], log: Path, env: dict) -> None:
    print(json.dumps({"event": "run", "cmd": " ".join(cmd)}), flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")


def raw_dataset(data: Path, raw: Path, labels: int) -> tuple[list[str], list[str]]:
    """Dataset900_Shapes from the experiment's data: ``labels`` training cases and every
    validation case; returns the two case lists."""
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    train = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "train" / "imagesTr").glob("*_0000.nii.gz"))[:labels]
    val = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "val" / "imagesTr").glob("*_0000.nii.gz"))
    names = {}
    for split, cases, prefix in (("train", train, "trn"), ("val", val, "val")):
        for case in cases:
            name = f"{prefix}{case}"
            names.setdefault(split, []).append(name)
            shutil.copyfile(data / split / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr" / f"{name}_0000.nii.gz")
            shutil.copyfile(data / split / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr" / f"{name}.nii.gz")
    meta = json.loads((data / "train" / "dataset.json").read_text())
    meta["numTraining"] = len(train) + len(val)
    (raw / "dataset.json").write_text(json.dumps(meta, indent=1))
    return names["train"], names["val"]


def narrow_plans(pre: Path, narrow: Path) -> Path:
    """nnU-Net's ResEnc plans with the experiment's narrow network and 32^3 patch in 3d_fullres."""
    plans = json.loads((pre / "nnUNetResEncUNetMPlans.json").read_text())
    ours = json.loads(narrow.read_text())["configurations"]["3d_fullres"]
    conf = plans["configurations"]["3d_fullres"]
    conf.update(architecture=ours["architecture"], patch_size=ours["patch_size"], batch_size=ours["batch_size"],
                data_identifier="narrow_3d_fullres")
    plans["plans_name"] = "nnUNetResEncNarrow"
    plans["configurations"] = {"3d_fullres": conf}
    out = pre / "nnUNetResEncNarrow.json"
    out.write_text(json.dumps(plans, indent=1))
    return out


def train_one(a) -> None:
    """One nnU-Net training in this process (nnU-Net's paths come from the environment, read when
    nnunetv2 is imported)."""
    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

    base = nnUNetTrainer_warmup if a.warmup_epochs else nnUNetTrainer

    class nnUNetTrainer_sparkmimShort(base):
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device | None = None):  # nnU-Net records these by name
            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = a.epochs
            self.num_iterations_per_epoch = a.iterations
            self.num_val_iterations_per_epoch = max(1, a.iterations // 5)
            self.initial_lr = a.lr
            if a.warmup_epochs:  # nnU-Net's warm-up trainer: the lr rises linearly, then its poly decay
                self.warmup_duration_whole_net = a.warmup_epochs

        def on_train_start(self):
            super().on_train_start()
            self.inference_allowed_mirroring_axes = None  # training still mirrors; validation does not

    pre = Path(os.environ["nnUNet_preprocessed"]) / "Dataset900_Shapes"
    plans = json.loads((pre / "nnUNetResEncNarrow.json").read_text())
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
    trainer = nnUNetTrainer_sparkmimShort(plans=plans,
                                          configuration="3d_fullres", fold=0,
                                          dataset_json=json.loads((pre / "dataset.json").read_text()),
                                          device=torch.device(a.device))
    if a.train_one != "-":
        trainer.initialize()
        load_pretrained_weights(trainer.network, a.train_one, verbose=False)
    trainer.run_training()
    trainer.perform_actual_validation(False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/segexp")
    p.add_argument("--labels", type=int, default=8)
    p.add_argument("--runs", default="spark", help="the experiment's runs (WORK/runs/NAME) to hand to nnU-Net")
    p.add_argument("--epochs", type=int, default=4, help="nnU-Net epochs (its default: 1000)")
    p.add_argument("--iterations", type=int, default=50, help="steps per nnU-Net epoch (its default: 250)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="train with nnU-Net's own nnUNetTrainer_warmup "
                   "(linear lr warm-up of the whole network over this many epochs; its default: 50 of 1000)")
    p.add_argument("--lr", type=float, default=1e-2, help="nnU-Net's initial lr (its default: 1e-2)")
    p.add_argument("--repeats", type=int, default=1, help="trainings per source (nnU-Net's training is not seeded)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--train-one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.train_one:
        return train_one(a)
    work = Path(a.work)
    base = work / "nnunet"
    env = dict(os.environ, nnUNet_raw=str(base / "raw"), nnUNet_preprocessed=str(base / "preprocessed"),
               nnUNet_results=str(base / "results"), nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"),
               nnUNet_compile="false")
    raw = base / "raw" / "Dataset900_Shapes"
    pre = base / "preprocessed" / "Dataset900_Shapes"
    train, val = raw_dataset(work / "data", raw, a.labels)
    if not (pre / "nnUNetResEncUNetMPlans.json").is_file():
        run(["nnUNetv2_extract_fingerprint", "-d", "900", "-np", "2"], base / "fingerprint.log", env)
        run(["nnUNetv2_plan_experiment", "-d", "900", "-pl", "nnUNetPlannerResEncM"], base / "plan.log", env)
    plans = narrow_plans(pre, work / "plans.json")
    (pre / "splits_final.json").write_text(json.dumps([{"train": train, "val": val}], indent=1))
    if not (pre / "narrow_3d_fullres").is_dir():
        run(["nnUNetv2_preprocess", "-d", "900", "-plans_name", "nnUNetResEncNarrow", "-c", "3d_fullres", "-np", "2"],
            base / "preprocess.log", env)
    sources = {"random": None}
    for name in a.runs.split(","):
        ckpt = work / "runs" / name / "nnunet-3d_fullres.pth"
        if not ckpt.is_file():
            run(["sparkmim", "export", str(work / "runs" / name), "--nnunet", str(plans)], base / f"export-{name}.log", env)
        sources[name] = ckpt
    for repeat in range(a.repeats):
        for name, ckpt in sources.items():
            schedule = f"labels{a.labels}-e{a.epochs}x{a.iterations}" + (f"-warmup{a.warmup_epochs}" if a.warmup_epochs else "") + (f"-lr{a.lr:g}" if a.lr != 1e-2 else "")
            results = base / "results" / schedule / f"{name}-{repeat}"
            summary = (results / "Dataset900_Shapes" / "nnUNetTrainer_sparkmimShort__nnUNetResEncNarrow__3d_fullres"
                       / "fold_0" / "validation" / "summary.json")
            if not summary.is_file():
                run([sys.executable, __file__, "--epochs", str(a.epochs), "--iterations", str(a.iterations),
                     "--warmup-epochs", str(a.warmup_epochs), "--lr", str(a.lr), "--device", a.device,
                     "--train-one", str(ckpt or "-")], base / f"train-{results.parent.name}-{name}-{repeat}.log",
                    dict(env, nnUNet_results=str(results)))
            dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
            print(json.dumps({"event": "result", "source": name, "repeat": repeat, "labels": a.labels,
                              "epochs": a.epochs, "iterations": a.iterations,
                              "warmup_epochs": a.warmup_epochs, "lr": a.lr, "dice": dice,
                              "summary": str(summary)}), flush=True)

if __name__ == "__main__":
    main()
