"""A configurable batch-normalized CNN: plain or residual, BN before or after the activation.

BatchNorm conventions (PyTorch, used here): `momentum=0.1` means
`running = 0.9 * running + 0.1 * batch`; `momentum=None` is a cumulative average; `eps=1e-5`.
Keras writes the same update the other way round: Keras `momentum=0.99` is PyTorch
`momentum=0.01`, and Keras's default `epsilon=1e-3` is `bn_eps=1e-3` here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn

Placement = Literal["pre", "post"]


@dataclass
class ModelConfig:
    """Hyper-parameters of the network; saved inside every checkpoint and bundle."""

    in_channels: int = 1
    input_height: int = 8
    input_width: int = 8
    num_classes: int = 10
    widths: list[int] = field(default_factory=lambda: [32, 64])  # channels per stage
    blocks_per_stage: int = 1
    residual: bool = False
    hidden: int = 64  # width of the classifier's hidden Linear -> BN1d -> ReLU
    stem_stride: int = 1  # 2 (with stem_pool) gives a ResNet-style stem for large inputs
    stem_pool: bool = False  # 3x3 stride-2 max pool after the stem
    bn_eps: float = 1e-5
    bn_momentum: float | None = 0.1  # PyTorch convention; None = cumulative average
    bn_placement: Placement = "pre"  # "pre": conv -> BN -> ReLU, "post": conv -> ReLU -> BN

    def __post_init__(self) -> None:
        if self.bn_placement not in ("pre", "post"):
            raise ValueError(
                f"Invalid bn_placement {self.bn_placement!r}. Only 'pre' and 'post' are supported."
            )
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {self.widths}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        self.widths = [int(w) for w in self.widths]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


def _bn2d(cfg: ModelConfig, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


class ConvBNAct(nn.Module):
    """conv -> BN -> ReLU ("pre") or conv -> ReLU -> BN ("post")."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.post = cfg.bn_placement == "post"
        # A conv directly followed by BN needs no bias: BN's beta does that job.
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=self.post)
        self.bn = _bn2d(cfg, cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            return self.bn(self.act(self.conv(x)))
        return self.act(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN downsample branch when shape changes."""

    def __init__(self, cfg: ModelConfig, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.post = cfg.bn_placement == "post"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=self.post)
        self.bn1 = _bn2d(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=self.post)
        self.bn2 = _bn2d(cfg, cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _bn2d(cfg, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        if self.post:
            out = self.bn1(self.relu(self.conv1(x)))
            out = self.bn2(self.relu(self.conv2(out)))
            return out + identity
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class BNNet(nn.Module):
    """stem -> stages (downsampling between them) -> global pool -> Linear-BN1d-ReLU -> Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        w0 = cfg.widths[0]
        self.stem = ConvBNAct(cfg, cfg.in_channels, w0, stride=cfg.stem_stride)
        # None (not nn.Identity) when off, so the stem's BN keeps the next layer as its user.
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if cfg.stem_pool else None
        layers: list[nn.Module] = []
        cin = w0
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.blocks_per_stage):
                downsample = i > 0 and j == 0
                if cfg.residual:
                    layers.append(BasicBlock(cfg, cin, width, stride=2 if downsample else 1))
                else:
                    if downsample:
                        layers.append(nn.MaxPool2d(2))
                    layers.append(ConvBNAct(cfg, cin, width))
                cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        post = cfg.bn_placement == "post"
        self.fc1 = nn.Linear(cin, cfg.hidden, bias=post)
        self.bn_fc = nn.BatchNorm1d(cfg.hidden, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        x = self.stem(x)
        if self.stem_pool is not None:
            x = self.stem_pool(x)
        x = self.flatten(self.pool(self.features(x)))
        if self.post:
            x = self.bn_fc(self.relu(self.fc1(x)))
        else:
            x = self.relu(self.bn_fc(self.fc1(x)))
        return self.fc2(x)


def build_model(cfg: ModelConfig) -> BNNet:
    return BNNet(cfg)


def resnet18_like(num_classes: int = 10, size: int = 128) -> ModelConfig:
    """ResNet-18 widths and depth on 3 x size x size input (the benchmarks' heavy model)."""
    return ModelConfig(
        in_channels=3,
        input_height=size,
        input_width=size,
        num_classes=num_classes,
        widths=[64, 128, 256, 512],
        blocks_per_stage=2,
        residual=True,
        hidden=256,
        stem_stride=2,
        stem_pool=True,
    )


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
