"""The published ImageNet CNN families, written out in PyTorch (torchvision cannot be imported
next to the CPU torch wheel here) and taken from Keras 3's `keras.applications`, with random
weights and realistic BatchNorm statistics, exported to ONNX the documented ways.

PyTorch: each builder follows torchvision's layout (channel counts, strides, BN placement, pools
with ceil_mode, activations); `width` multiplies every channel count and `depth` caps the blocks
of every stage, so the tests build tiny versions of the same patterns. Statistics: gammas and
betas drawn (a tenth of the gammas negative), running statistics estimated in train mode
(momentum=None: the cumulative average) on a few random batches, then shifted by up to a tenth of
a standard deviation and scaled by 0.8-1.25. Exported with `torch.onnx.export(model.eval(), x,
f, dynamo=True, optimize=False)` (BatchNormalization kept), a variable batch axis; the
TorchScript exporter (`dynamo=False, training=PRESERVE`) only where dynamo fails (none here).

Keras 3: `keras.applications.<Model>(weights=None)` (tiny: their width knob `alpha`, or the
generic builders with fewer blocks), statistics estimated the same way (momentum 0, one
train-mode call), exported with `model.export(path, format="onnx")`.

    python -m bench.families torch resnet50 OUT.onnx [--size 224] [--width 1] [--depth N]
    python -m bench.families keras ResNet50 OUT.onnx [--size 224] [--tiny]
    python -m bench.families torch resnet50,googlenet OUT_DIR ...   # several: OUT_DIR/<name>.onnx

Each writes OUT.onnx, and beside it OUT.x.npy (a batch in the model's layout) and OUT.ref.npy
(the framework's own eval answer on it: float64 for torch, float32 for Keras), the independent
reference. Run in a child process: torch's and TensorFlow's import cost and threads stay out of
the caller.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

SEED = 0
CLASSES = 1000


# --------------------------------------------------------------------------------------------
# PyTorch architectures (torch imported lazily: the benchmark's parent process never needs it)
# --------------------------------------------------------------------------------------------


def _torch_builders():  # noqa: C901 - one closure per family keeps torch out of module import
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812 - torch's own spelling

    def ch(c: float, width: float, div: int = 4) -> int:
        """c channels scaled by width, a multiple of div, at least div."""
        return max(div, int(c * width + div / 2) // div * div)

    def cap(n: int, depth: int | None) -> int:
        return n if depth is None else max(1, min(n, depth))

    def conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU, eps=1e-5, pad=None):
        layers = [
            nn.Conv2d(
                cin, cout, k, stride, k // 2 if pad is None else pad, groups=groups, bias=False
            ),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
        return nn.Sequential(*layers)

    # ResNet / ResNeXt / Wide ResNet ---------------------------------------------------------
    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, cout, stride, groups):
            super().__init__()
            self.body = nn.Sequential(
                conv_bn(cin, mid, 1),
                conv_bn(mid, mid, 3, stride, groups),
                conv_bn(mid, cout, 1, act=None),
            )
            self.down = (
                conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
            )

        def forward(self, x):
            short = x if self.down is None else self.down(x)
            return torch.relu(self.body(x) + short)

    def resnet(width, depth, groups=1, mid_mult=1.0):
        g = groups if groups == 1 else max(2, round(groups * width))
        stem = ch(64, width)
        layers = [conv_bn(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1)]
        cin = stem
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            mid = ch(planes * mid_mult, width, max(4, g))
            cout = ch(planes * 4, width)
            for b in range(cap(blocks, depth)):
                layers.append(Bottleneck(cin, mid, cout, 2 if b == 0 and i > 0 else 1, g))
                cin = cout
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES)
        )

    # MobileNetV2 ----------------------------------------------------------------------------
    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
            layers += [
                conv_bn(hidden, hidden, 3, stride, hidden, nn.ReLU6),
                conv_bn(hidden, cout, 1, act=None),
            ]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    def mobilenet_v2(width, depth):
        settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        cin = ch(32, width, 8)
        layers = [conv_bn(3, cin, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in settings:
            cout = ch(c, width, 8)
            for i in range(cap(n, depth)):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = ch(1280, width, 8)
        layers += [
            conv_bn(cin, last, 1, act=nn.ReLU6),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(last, CLASSES),
        ]
        return nn.Sequential(*layers)

    # MobileNetV3-Small ----------------------------------------------------------------------
    class SqueezeExcite(nn.Module):
        def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
            self.act, self.gate = act(), gate()

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * self.gate(self.fc2(self.act(self.fc1(s))))

    class V3Block(nn.Module):
        def __init__(self, cin, k, exp, cout, se, act, stride):
            super().__init__()
            layers = [conv_bn(cin, exp, 1, act=act)] if exp != cin else []
            layers.append(conv_bn(exp, exp, k, stride, exp, act))
            if se:
                layers.append(SqueezeExcite(exp, max(8, int(exp // 4 + 4) // 8 * 8)))
            layers.append(conv_bn(exp, cout, 1, act=None))
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    def mobilenet_v3_small(width, depth):
        re, hs = nn.ReLU, nn.Hardswish
        conf = [
            (16, 3, 16, 16, True, re, 2),
            (16, 3, 72, 24, False, re, 2),
            (24, 3, 88, 24, False, re, 1),
            (24, 5, 96, 40, True, hs, 2),
            (40, 5, 240, 40, True, hs, 1),
            (40, 5, 240, 40, True, hs, 1),
            (40, 5, 120, 48, True, hs, 1),
            (48, 5, 144, 48, True, hs, 1),
            (48, 5, 288, 96, True, hs, 2),
            (96, 5, 576, 96, True, hs, 1),
            (96, 5, 576, 96, True, hs, 1),
        ]
        if depth is not None:  # at most `depth` rows of each (channels, activation) run
            kept: list = []
            for row in conf:
                if sum((r[3], r[5]) == (row[3], row[5]) for r in kept) < depth:
                    kept.append(row)
            conf = kept
        c = lambda v: ch(v, width, 8)  # noqa: E731
        layers = [conv_bn(3, c(16), 3, 2, act=hs)]
        cin = c(16)
        for _, k, exp, cout, se, act, s in conf:
            layers.append(V3Block(cin, k, c(exp), c(cout), se, act, s))
            cin = c(cout)
        last = c(576)
        layers += [
            conv_bn(cin, last, 1, act=hs),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(last, c(1024)),
            hs(),
            nn.Dropout(0.2),
            nn.Linear(c(1024), CLASSES),
        ]
        return nn.Sequential(*layers)

    # EfficientNet-B0 ------------------------------------------------------------------------
    class MBConv(nn.Module):
        def __init__(self, cin, cout, k, stride, expand):
            super().__init__()
            hidden = cin * expand
            layers = [conv_bn(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
            layers += [
                conv_bn(hidden, hidden, k, stride, hidden, nn.SiLU),
                SqueezeExcite(hidden, max(1, cin // 4), nn.SiLU, nn.Sigmoid),
                conv_bn(hidden, cout, 1, act=None),
            ]
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    def efficientnet_b0(width, depth):
        settings = [
            (1, 3, 1, 16, 1),
            (6, 3, 2, 24, 2),
            (6, 5, 2, 40, 2),
            (6, 3, 2, 80, 3),
            (6, 5, 1, 112, 3),
            (6, 5, 2, 192, 4),
            (6, 3, 1, 320, 1),
        ]
        cin = ch(32, width, 8)
        layers = [conv_bn(3, cin, 3, 2, act=nn.SiLU)]
        for e, k, s, c, n in settings:
            cout = ch(c, width, 8)
            for i in range(cap(n, depth)):
                layers.append(MBConv(cin, cout, k, s if i == 0 else 1, e))
                cin = cout
        last = ch(1280, width, 8)
        layers += [
            conv_bn(cin, last, 1, act=nn.SiLU),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(last, CLASSES),
        ]
        return nn.Sequential(*layers)

    # DenseNet-121 (BN after Concat) ---------------------------------------------------------
    class DenseLayer(nn.Module):
        def __init__(self, cin, growth, bn_size):
            super().__init__()
            self.norm1, self.conv1 = (
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            )
            self.norm2 = nn.BatchNorm2d(bn_size * growth)
            self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

        def forward(self, features: list):
            x = torch.cat(features, 1)
            x = self.conv1(torch.relu(self.norm1(x)))
            return self.conv2(torch.relu(self.norm2(x)))

    class DenseBlock(nn.Module):
        def __init__(self, n, cin, growth, bn_size):
            super().__init__()
            self.layers = nn.ModuleList(
                DenseLayer(cin + i * growth, growth, bn_size) for i in range(n)
            )

        def forward(self, x):
            features = [x]
            for layer in self.layers:
                features.append(layer(features))
            return torch.cat(features, 1)

    def densenet121(width, depth):
        growth, cin = ch(32, width), ch(64, width)
        layers = [conv_bn(3, cin, 7, 2), nn.MaxPool2d(3, 2, 1)]
        blocks = (6, 12, 24, 16)
        for i, n in enumerate(blocks):
            n = cap(n, depth)
            layers.append(DenseBlock(n, cin, growth, 4))
            cin += n * growth
            if i < len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(cin),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(cin, cin // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                cin //= 2
        layers += [
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, CLASSES),
        ]
        return nn.Sequential(*layers)

    # ShuffleNetV2 x1.0 (channel split and shuffle) ------------------------------------------
    def channel_shuffle(x, groups: int):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
        return x.view(b, c, h, w)

    class ShuffleBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            half = cout // 2
            self.stride = stride
            if stride > 1:
                self.branch1 = nn.Sequential(
                    conv_bn(cin, cin, 3, stride, cin, act=None), conv_bn(cin, half, 1)
                )
            c2 = cin if stride > 1 else half
            self.branch2 = nn.Sequential(
                conv_bn(c2, half, 1),
                conv_bn(half, half, 3, stride, half, act=None),
                conv_bn(half, half, 1),
            )

        def forward(self, x):
            if self.stride == 1:
                x1, x2 = x.chunk(2, dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            return channel_shuffle(out, 2)

    def shufflenet_v2(width, depth):
        outs = [ch(c, width) for c in (24, 116, 232, 464)] + [ch(1024, width)]
        layers = [conv_bn(3, outs[0], 3, 2), nn.MaxPool2d(3, 2, 1)]
        cin = outs[0]
        for repeats, cout in zip((4, 8, 4), outs[1:4], strict=True):
            for i in range(cap(repeats, depth)):
                layers.append(ShuffleBlock(cin, cout, 2 if i == 0 else 1))
                cin = cout
        layers += [conv_bn(cin, outs[4], 1)]
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(outs[4], CLASSES)
        )

    # RegNetY-400MF (grouped convs, SE) ------------------------------------------------------
    class RegNetBlock(nn.Module):
        def __init__(self, cin, cout, stride, group_width, se_ratio=0.25):
            super().__init__()
            self.body = nn.Sequential(
                conv_bn(cin, cout, 1),
                conv_bn(cout, cout, 3, stride, cout // group_width),
                SqueezeExcite(cout, max(1, int(round(se_ratio * cin))), nn.ReLU, nn.Sigmoid),
                conv_bn(cout, cout, 1, act=None),
            )
            self.proj = (
                conv_bn(cin, cout, 1, stride, act=None) if cin != cout or stride != 1 else None
            )

        def forward(self, x):
            short = x if self.proj is None else self.proj(x)
            return torch.relu(short + self.body(x))

    def regnet_y_400mf(width, depth):
        gw = 8 if width >= 1 else 4
        cin = ch(32, width)
        layers = [conv_bn(3, cin, 3, 2)]
        for w, d in zip((48, 104, 208, 440), (1, 3, 6, 6), strict=True):
            cout = ch(w, width, gw)
            for i in range(cap(d, depth)):
                layers.append(RegNetBlock(cin, cout, 2 if i == 0 else 1, gw))
                cin = cout
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES)
        )

    # GoogLeNet (ceil_mode pools, Concat of branches) ----------------------------------------
    def basic(cin, cout, k, stride=1, pad=None):
        return conv_bn(cin, cout, k, stride, eps=0.001, pad=pad)

    class Inception(nn.Module):
        def __init__(self, cin, c1, c3r, c3, c5r, c5, pool):
            super().__init__()
            self.b1 = basic(cin, c1, 1)
            self.b2 = nn.Sequential(basic(cin, c3r, 1), basic(c3r, c3, 3))
            self.b3 = nn.Sequential(basic(cin, c5r, 1), basic(c5r, c5, 3))  # 3x3, as torchvision
            self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), basic(cin, pool, 1))

        def forward(self, x):
            return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)

    def googlenet(width, depth):
        c = lambda v: ch(v, width)  # noqa: E731
        cfg = {
            "3a": (64, 96, 128, 16, 32, 32),
            "3b": (128, 128, 192, 32, 96, 64),
            "4a": (192, 96, 208, 16, 48, 64),
            "4b": (160, 112, 224, 24, 64, 64),
            "4c": (128, 128, 256, 24, 64, 64),
            "4d": (112, 144, 288, 32, 64, 64),
            "4e": (256, 160, 320, 32, 128, 128),
            "5a": (256, 160, 320, 32, 128, 128),
            "5b": (384, 192, 384, 48, 128, 128),
        }
        stages = [["3a", "3b"], ["4a", "4b", "4c", "4d", "4e"], ["5a", "5b"]]
        layers = [
            basic(3, c(64), 7, 2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            basic(c(64), c(64), 1),
            basic(c(64), c(192), 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        ]
        cin = c(192)
        for s, names in enumerate(stages):
            if depth is not None:
                names = names[:1] + names[-1:] if depth < len(names) else names
            for n in names:
                row = [c(v) for v in cfg[n]]
                layers.append(Inception(cin, *row))
                cin = row[0] + row[2] + row[4] + row[5]
            if s == 0:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            elif s == 1:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(cin, CLASSES)]
        return nn.Sequential(*layers)

    # MNASNet 1.0 ----------------------------------------------------------------------------
    def mnasnet(width, depth):
        c = lambda v: ch(v, width, 8)  # noqa: E731
        layers = [
            conv_bn(3, c(32), 3, 2),
            conv_bn(c(32), c(32), 3, 1, c(32)),
            conv_bn(c(32), c(16), 1, act=None),
        ]
        cin = c(16)
        for cout, k, s, e, n in (
            (24, 3, 2, 3, 3),
            (40, 5, 2, 3, 3),
            (80, 5, 2, 6, 3),
            (96, 3, 1, 6, 2),
            (192, 5, 2, 6, 4),
            (320, 3, 1, 6, 1),
        ):
            for i in range(cap(n, depth)):
                mid = cin * e
                block = nn.Sequential(
                    conv_bn(cin, mid, 1),
                    conv_bn(mid, mid, k, s if i == 0 else 1, mid),
                    conv_bn(mid, c(cout), 1, act=None),
                )
                layers.append(Residual(block) if i > 0 else block)
                cin = c(cout)
        last = c(1280)
        layers += [
            conv_bn(cin, last, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(last, CLASSES),
        ]
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return x + self.body(x)

    # VGG-11 with BN -------------------------------------------------------------------------
    def vgg11_bn(width, depth, size=224):
        layers, cin = [], 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(conv_bn(cin, ch(v, width), 3))
                cin = ch(v, width)
        side = max(1, min(7, size // 32))  # torchvision: AdaptiveAvgPool2d(7), 7x7 at 224
        hidden = ch(4096, width)
        layers += [
            nn.AdaptiveAvgPool2d(side),
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(hidden, CLASSES),
        ]
        return nn.Sequential(*layers)

    # SqueezeNet 1.1 (no BN) -----------------------------------------------------------------
    class Fire(nn.Module):
        def __init__(self, cin, squeeze, e1, e3):
            super().__init__()
            self.squeeze = nn.Conv2d(cin, squeeze, 1)
            self.e1, self.e3 = nn.Conv2d(squeeze, e1, 1), nn.Conv2d(squeeze, e3, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)

    def squeezenet1_1(width, depth):
        c = lambda v: ch(v, width)  # noqa: E731
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        layers = [nn.Conv2d(3, c(64), 3, 2), nn.ReLU(True), pool()]
        cin = c(64)
        for item in (
            (16, 64),
            (16, 64),
            "M",
            (32, 128),
            (32, 128),
            "M",
            (48, 192),
            (48, 192),
            (64, 256),
            (64, 256),
        ):
            if item == "M":
                layers.append(pool())
                continue
            s, e = c(item[0]), c(item[1])
            layers.append(Fire(cin, s, e, e))
            cin = 2 * e
        layers += [
            nn.Dropout(0.5),
            nn.Conv2d(cin, CLASSES, 1),
            nn.ReLU(True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        return nn.Sequential(*layers)

    # ConvNeXt-Tiny (LayerNorm, GELU, no BN) -------------------------------------------------
    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class CNBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

        def forward(self, x):
            y = self.norm(self.dw(x).permute(0, 2, 3, 1))
            y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
            return x + self.scale * y

    def convnext_tiny(width, depth):
        dims = [ch(d, width, 8) for d in (96, 192, 384, 768)]
        layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (dim, n) in enumerate(zip(dims, (3, 3, 9, 3), strict=True)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [CNBlock(dim) for _ in range(cap(n, depth))]
        layers += [
            nn.AdaptiveAvgPool2d(1),
            LayerNorm2d(dims[-1], eps=1e-6),
            nn.Flatten(),
            nn.Linear(dims[-1], CLASSES),
        ]
        return nn.Sequential(*layers)

    return {
        "resnet50": lambda w, d, s: resnet(w, d),
        "resnext50_32x4d": lambda w, d, s: resnet(w, d, groups=32, mid_mult=2.0),
        "wide_resnet50_2": lambda w, d, s: resnet(w, d, mid_mult=2.0),
        "mobilenet_v2": lambda w, d, s: mobilenet_v2(w, d),
        "mobilenet_v3_small": lambda w, d, s: mobilenet_v3_small(w, d),
        "efficientnet_b0": lambda w, d, s: efficientnet_b0(w, d),
        "densenet121": lambda w, d, s: densenet121(w, d),
        "shufflenet_v2_x1_0": lambda w, d, s: shufflenet_v2(w, d),
        "regnet_y_400mf": lambda w, d, s: regnet_y_400mf(w, d),
        "googlenet": lambda w, d, s: googlenet(w, d),
        "mnasnet1_0": lambda w, d, s: mnasnet(w, d),
        "vgg11_bn": lambda w, d, s: vgg11_bn(w, d, s),
        "squeezenet1_1": lambda w, d, s: squeezenet1_1(w, d),
        "convnext_tiny": lambda w, d, s: convnext_tiny(w, d),
    }


# Display names, in the order the benchmark reports them.
TORCH_FAMILIES = {
    "resnet50": "ResNet-50",
    "resnext50_32x4d": "ResNeXt-50 32x4d",
    "wide_resnet50_2": "Wide ResNet-50-2",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet_v3_small": "MobileNetV3-Small",
    "efficientnet_b0": "EfficientNet-B0",
    "densenet121": "DenseNet-121",
    "shufflenet_v2_x1_0": "ShuffleNetV2 x1.0",
    "regnet_y_400mf": "RegNetY-400MF",
    "googlenet": "GoogLeNet",
    "mnasnet1_0": "MNASNet 1.0",
    "vgg11_bn": "VGG-11-BN",
    "squeezenet1_1": "SqueezeNet 1.1",
    "convnext_tiny": "ConvNeXt-Tiny",
}
KERAS_FAMILIES = {
    "ResNet50": "ResNet50",
    "MobileNetV2": "MobileNetV2",
    "MobileNetV3Small": "MobileNetV3Small",
    "EfficientNetB0": "EfficientNetB0",
    "DenseNet121": "DenseNet121",
    "Xception": "Xception",
}


def build_torch(name: str, width: float = 1.0, depth: int | None = None, size: int = 224):
    """The family's nn.Module with random weights (seeded), statistics not yet set."""
    import torch

    torch.manual_seed(SEED)
    return _torch_builders()[name](width, depth, size)


def set_realistic_statistics(model, size: int, batches: int = 3, batch: int = 8) -> None:
    """Gammas/betas drawn (a tenth of the gammas negative), running statistics estimated in train
    mode with momentum=None on random batches, then shifted and scaled; layer scales of
    ConvNeXt set so its blocks matter. The model is left in eval mode."""
    import torch
    from torch import nn

    rng = np.random.default_rng(SEED)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            sign = np.where(rng.uniform(size=n) < 0.1, -1.0, 1.0)
            bn.weight.copy_(torch.from_numpy(sign * rng.uniform(0.5, 1.5, n)).float())
            bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, n)).float())
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches
        for name, p in model.named_parameters():
            if name.endswith("scale") and p.dim() == 3:  # ConvNeXt's layer scale
                p.copy_(torch.from_numpy(rng.uniform(0.2, 1.0, p.shape)).float())
        model.train()
        for _ in range(batches):
            model(torch.from_numpy(rng.uniform(-2, 2, (batch, 3, size, size))).float())
        for bn in bns:
            n = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean += torch.from_numpy(rng.uniform(-0.1, 0.1, n)).float() * std
            bn.running_var *= torch.from_numpy(rng.uniform(0.8, 1.25, n)).float()
    model.eval()


def export_torch(
    name: str, out: Path, size: int, width: float, depth: int | None, dynamic_batch: bool = True
) -> str:
    """Build, set statistics, export; writes OUT, OUT.x.npy, OUT.ref.npy. Returns the exporter.
    A variable batch axis (dynamic_shapes): without it dynamo bakes the example's batch into
    Flatten's Reshape, and bnfold import refuses the file (it serves batches), rightly."""
    import torch

    model = build_torch(name, width, depth, size)
    set_realistic_statistics(model, size)
    rng = np.random.default_rng(SEED + 1)
    x = rng.uniform(-2, 2, (4, 3, size, size)).astype(np.float32)
    example = (torch.from_numpy(x[:2] if dynamic_batch else x[:1]),)
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        torch.onnx.export(
            model.eval(),
            example,
            str(out),
            dynamo=True,
            optimize=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=dynamic,
            verbose=False,
            external_data=False,
        )
        exporter = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any exporter failure: the documented fallback
        print(
            f"{name}: dynamo export failed ({type(exc).__name__}: {exc}); TorchScript",
            file=sys.stderr,
        )
        torch.onnx.export(
            model.eval(),
            example,
            str(out),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}} if dynamic_batch else None,
        )
        exporter = "torchscript"
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(x).double()).numpy()
    np.save(f"{out}.x.npy", x)
    np.save(f"{out}.ref.npy", ref)
    return exporter


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------


def build_keras(name: str, size: int, tiny: bool = False):
    """keras.applications' model with weights=None; tiny: its width knob (alpha) or the generic
    builder with one block per stage, the same layer patterns."""
    from keras import applications as apps

    common = {
        "weights": None,
        "input_shape": (size, size, 3),
        "classes": CLASSES,
        "classifier_activation": None,
    }
    if not tiny:
        return getattr(apps, name)(**common)
    if name == "MobileNetV2":
        return apps.MobileNetV2(alpha=0.35, **common)
    if name == "MobileNetV3Small":
        return apps.MobileNetV3Small(alpha=0.75, include_preprocessing=False, **common)
    if name == "EfficientNetB0":
        from keras.src.applications.efficientnet import EfficientNet

        return EfficientNet(
            0.25, 0.25, size, 0.2, name="efficientnet_tiny", include_top=True, **common
        )
    if name == "DenseNet121":
        from keras.src.applications.densenet import DenseNet

        return DenseNet([1, 2, 2, 1], include_top=True, **common)
    if name == "ResNet50":
        from keras.src.applications.resnet import ResNet, stack_residual_blocks_v1

        def stack_fn(x):
            x = stack_residual_blocks_v1(x, 16, 2, stride1=1, name="conv2")
            x = stack_residual_blocks_v1(x, 32, 2, name="conv3")
            return stack_residual_blocks_v1(x, 64, 2, name="conv4")

        return ResNet(stack_fn, False, True, name="resnet_tiny", include_top=True, **common)
    if name == "Xception":
        return apps.Xception(**{**common, "input_shape": (max(size, 71), max(size, 71), 3)})
    raise KeyError(name)


def embed_normalization_statistics(model) -> None:
    """Keras's Normalization layer (EfficientNet's stem) keeps its mean and variance as tensors
    computed at build time, which the ONNX export captures as two more graph inputs with no
    value in the file. As variables they are exported as weights: the file is self-contained.
    (object.__setattr__: Keras's own refuses new state on a built layer.)"""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            for attr in ("mean", "variance"):
                value = keras.Variable(np.asarray(getattr(layer, attr)), trainable=False)
                object.__setattr__(layer, attr, value)


def export_keras(name: str, out: Path, size: int, tiny: bool) -> str:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(SEED)
    model = build_keras(name, size, tiny)
    side = model.input_shape[1]
    rng = np.random.default_rng(SEED)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        gamma, beta, mean, var = bn.get_weights()
        n = gamma.shape
        sign = np.where(rng.uniform(size=n) < 0.1, -1.0, 1.0)
        bn.set_weights([sign * rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), mean, var])
        bn.momentum = 0.0  # the moving statistics become the batch's
    for layer in model.layers:  # non-zero biases (zero ones are optimized away by the export)
        w = layer.get_weights()
        if len(w) == 2 and not isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([w[0], rng.normal(0, 0.1, w[1].shape).astype(np.float32)])
    data = rng.uniform(-2, 2, (16, side, side, 3)).astype(np.float32)
    model(data, training=True)  # one train-mode call: statistics estimated on the batch
    for bn in bns:
        gamma, beta, mean, var = bn.get_weights()
        std = np.sqrt(var)
        mean = mean + rng.uniform(-0.1, 0.1, mean.shape) * std
        bn.set_weights([gamma, beta, mean, var * rng.uniform(0.8, 1.25, var.shape)])
    embed_normalization_statistics(model)
    x = rng.uniform(-2, 2, (4, side, side, 3)).astype(np.float32)
    ref = np.asarray(model(x, training=False), dtype=np.float64)
    model.export(str(out), format="onnx", verbose=False)
    np.save(f"{out}.x.npy", x)
    np.save(f"{out}.ref.npy", ref)
    return "keras export (tf2onnx)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.families", description=__doc__.splitlines()[0]
    )
    p.add_argument("framework", choices=("torch", "keras"))
    p.add_argument("name")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="keras: the small version")
    p.add_argument(
        "--static-batch", action="store_true", help="torch: the example's batch of 1, fixed"
    )
    args = p.parse_args(argv)
    names = args.name.split(",")
    for name in names:  # several names: OUT is a folder, each model OUT/<name>.onnx
        out = args.out / f"{name}.onnx" if len(names) > 1 else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.framework == "torch":
            exporter = export_torch(
                name, out, args.size, args.width, args.depth, not args.static_batch
            )
        else:
            exporter = export_keras(name, out, args.size, args.tiny)
        print(f"exported {name} with {exporter}: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
