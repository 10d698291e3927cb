"""Small 3-D convnets for the tests (float64 copies of the 3-D zoo, built as the command line builds them)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparkmim.backbones import create_backbone, feature_modules_for

# small nnU-Net plans: an anisotropic ResEnc plan (in-plane-only strides, 1x3x3 kernels at the
# first stages, as nnU-Net plans thick-slice data) and an isotropic plain plan
PLANS = {
    "anisotropic": dict(network="ResidualEncoderUNet", n_stages=4, features=[4, 8, 8, 16],
                        kernels=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
                        strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], blocks=[1, 2, 2, 2]),
    "plain": dict(network="PlainConvUNet", n_stages=4, features=[4, 8, 16, 16], kernels=[[3, 3, 3]] * 4,
                  strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], blocks=[2, 2, 2, 2]),
}


def plans_dict(kind: str, patch_size=(16, 32, 32)) -> dict:
    """An nnU-Net v2 plans file (the layout nnU-Net 2.4+ writes) with a 3d_fullres configuration
    of ``PLANS[kind]`` and a 3d_cascade_fullres one inheriting from it."""
    p = PLANS[kind]
    blocks = "n_blocks_per_stage" if p["network"] == "ResidualEncoderUNet" else "n_conv_per_stage"
    n = p["n_stages"]
    arch = {"network_class_name": f"dynamic_network_architectures.architectures.unet.{p['network']}",
            "arch_kwargs": {"n_stages": n, "features_per_stage": p["features"],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": p["kernels"],
                            "strides": p["strides"], blocks: p["blocks"],
                            "n_conv_per_stage_decoder": [1 if blocks == "n_blocks_per_stage" else 2] * (n - 1),
                            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {"dataset_name": "Dataset001_Test", "plans_name": "nnUNetPlans",
            "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2,
                                              "patch_size": list(patch_size), "spacing": [3.0, 1.0, 1.0],
                                              "architecture": arch},
                               "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}


def write_plans(path, kind: str, **kw):
    import json

    path.write_text(json.dumps(plans_dict(kind, **kw)))
    return path


class _SE(nn.Module):
    """Squeeze-excitation: a gate from the mean over the visible sites."""

    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv3d(c, c // 2, 1), nn.Conv3d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool3d(x, 1)))))


class Custom3d(nn.Module):
    """A custom 3-D convnet: anisotropic stem (stride 1 in depth) with InstanceNorm3d, max
    pooling, a residual block with BatchNorm3d, GroupNorm with a squeeze-excitation gate and a
    grouped dilated convolution, average pooling that leaves padding out of the mean."""

    def __init__(self, c=8, in_chans=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, c, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
                                  nn.InstanceNorm3d(c, affine=True), nn.ReLU())
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.conv1 = nn.Sequential(nn.Conv3d(c, c, 3, padding=1, bias=False), nn.BatchNorm3d(c), nn.ReLU(),
                                   nn.Conv3d(c, c, 3, padding=2, dilation=2, groups=2, bias=False), nn.BatchNorm3d(c))
        self.layer2 = nn.Sequential(nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.GELU(),
                                    _SE(2 * c))
        self.layer3 = nn.Sequential(nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1), nn.BatchNorm3d(4 * c), nn.ReLU())
        self.smooth = nn.AvgPool3d((1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
        self.head = nn.Linear(4 * c, 2)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.smooth(F.relu(x + self.conv1(x)))
        x = self.layer3(self.layer2(x))
        return self.head(x.mean((2, 3, 4)))


class _Block3d(nn.Module):
    """A ConvNeXt-style block: depthwise 3x3x3, then channels-last LayerNorm, Linear, GELU, Linear,
    layer scale, residual."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv3d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 4, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 4, 1, 2, 3)


class Next3d(nn.Module):
    """A custom 3-D net of the other family: patchify stem (2, 4, 4) with a one-group GroupNorm,
    ConvNeXt-style blocks, stride-2 downsampling, and at stride (4, 8, 8) a branch that pools by
    2, comes back up with a transposed convolution plus nearest interpolation, and is added."""

    def __init__(self, c=8, in_chans=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_chans, c, (2, 4, 4), stride=(2, 4, 4)), nn.GroupNorm(1, c))
        self.stage1 = _Block3d(c)
        self.down2 = nn.Conv3d(c, 2 * c, 2, stride=2)
        self.stage2 = _Block3d(2 * c)
        self.up = nn.ConvTranspose3d(2 * c, 2 * c, 2, stride=2)
        self.down3 = nn.Conv3d(2 * c, 4 * c, 2, stride=2)
        self.stage3 = _Block3d(4 * c)

    def forward(self, x):
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down2(x))
        pooled = F.avg_pool3d(x, 2)
        x = x + self.up(pooled) + F.interpolate(pooled, scale_factor=2, mode="nearest")
        return self.stage3(self.down3(x))


def _monai():
    return pytest.importorskip("monai.networks.nets")


def build3d(name):
    """(model, in_chans, feature_modules) for a zoo entry, float64, seeded."""
    torch.manual_seed(0)
    if name == "custom":
        return Custom3d().double(), 1, None
    if name == "custom-next":
        return Next3d().double(), 1, ["stage1", "stage2", "stage3"]
    if name == "monai-resnet10":
        nets = _monai()
        m = nets.ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=3,
                        n_input_channels=1, num_classes=2)
        return m.double(), 1, None
    if name == "monai-dynunet":
        nets = _monai()
        m = nets.DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                         upsample_kernel_size=[2] * 4, filters=[8, 16, 32, 64, 128], norm_name="instance")
        return m.double(), 1, feature_modules_for("monai:dynunet")
    if name == "monai-segresnet":
        nets = _monai()
        m = nets.SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1, 1))
        return m.double(), 1, feature_modules_for("monai:segresnet")
    if name.startswith("nnunet-small-"):  # nnU-Net's network of a preset at narrow widths
        pytest.importorskip("dynamic_network_architectures")
        from sparkmim.backbones import create_nnunet

        preset = name.removeprefix("nnunet-small-")  # 4 stages (patch 8), narrow, fewer blocks
        small = dict(n_stages=4, features_per_stage=[4, 8, 8, 16], strides=[1, 2, 2, 2])
        small.update(dict(n_blocks_per_stage=[1, 2, 2, 2], n_conv_per_stage_decoder=[1] * 3) if preset != "plain"
                     else dict(n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3))
        return create_nnunet(preset, 1, initialize=False, **small).double(), 1, [f"encoder.stages.{i}" for i in (1, 2, 3)]
    if name.startswith("nnunet-plan-"):  # a small plans file, built as --model nnunet:PLANS.json builds it
        pytest.importorskip("dynamic_network_architectures")
        import tempfile
        from pathlib import Path

        from sparkmim.nnunet import create_nnunet

        plans = write_plans(Path(tempfile.mkdtemp()) / "nnUNetPlans.json", name.removeprefix("nnunet-plan-"))
        return (create_nnunet(str(plans), 1, initialize=False).double(), 1,
                feature_modules_for(f"nnunet:{plans}"))
    if name.startswith("nnunet:"):
        pytest.importorskip("dynamic_network_architectures")
        return create_backbone(name, in_chans=1).double(), 1, feature_modules_for(name)
    if name == "monai-efficientnet-b0":
        nets = _monai()
        return nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=3, in_channels=1, num_classes=2).double(), 1, None
    if name.startswith("monai:"):  # as the command line builds it
        return create_backbone(name, in_chans=1).double(), 1, feature_modules_for(name)
    return create_backbone(f"torchvision:{name}").double(), 3, None
