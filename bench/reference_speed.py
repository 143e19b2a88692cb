"""How fast the float64 reference is: a ResNet-50-like graph at 224x224 (written out here,
torchvision cannot be imported next to the CPU torch wheel) timed with the reference's fast
kernels, with plain onnx.reference (the kernels it had before), and with onnxruntime in float32
on the same images; and a GoogLeNet-like block (ceil_mode pools Concat'ed with conv branches)
checked against onnxruntime. Not part of the tests or of `make bench`.

    .venv/bin/python bench/reference_speed.py \\
        [--images 16] [--old-images 8] [--repeat 3] [--skip-old]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

from bnfold.toolchain.reference import (
    Float64Reference,
    GroupedConvTranspose,
    InferenceBatchNormalization,
    float64_model,
)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            *_conv_bn(cin, width, 1), nn.ReLU(),
            *_conv_bn(width, width, 3, stride, groups), nn.ReLU(),
            *_conv_bn(width, cout, 1),
        )  # fmt: skip
        self.short = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


def resnet50_like(classes: int = 1000) -> nn.Module:
    """torchvision's resnet50 layout: stem, [3, 4, 6, 3] bottlenecks, 53 BatchNorms."""
    layers: list[nn.Module] = [
        *_conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]  # fmt: skip
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Inception(nn.Module):
    """GoogLeNet's inception block: 1x1, 1x1-3x3, 1x1-3x3, maxpool(ceil)-1x1, Concat'ed."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn(cin, 16, 1), nn.ReLU())
        self.b2 = nn.Sequential(*_conv_bn(cin, 8, 1), nn.ReLU(), *_conv_bn(8, 16, 3), nn.ReLU())
        self.b3 = nn.Sequential(*_conv_bn(cin, 4, 1), nn.ReLU(), *_conv_bn(4, 8, 3), nn.ReLU())
        self.b4 = nn.Sequential(
            nn.MaxPool2d(3, 1, 1, ceil_mode=True), *_conv_bn(cin, 8, 1), nn.ReLU()
        )

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


def googlenet_like() -> nn.Module:
    """GoogLeNet's stem pools (3, 2, ceil_mode=True) between inception blocks: 56 -> 28 -> 14."""
    return nn.Sequential(
        *_conv_bn(3, 24, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(24), nn.MaxPool2d(3, 2, ceil_mode=True),
        Inception(48), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
    )  # fmt: skip


def realistic_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, some scales negative."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            sign = torch.where(torch.rand(n, generator=g) < 0.1, -1.0, 1.0)
            m.weight.data.copy_(sign * (torch.rand(n, generator=g) * 0.5 + 0.5))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def export(model: nn.Module, size: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.zeros(1, 3, size, size),), buf, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17, dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def timed(fn, *args, repeat: int = 1):
    """fn's result and its best time over `repeat` runs (the machine is shared)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def chunk(x: np.ndarray) -> int:
    """The importer's chunk for the reference: 2**20 input values (6 images at 224x224)."""
    return max(1, min(32, 2**20 // int(np.prod(x.shape[1:]))))


def run_new(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    batch = chunk(x)
    ref = Float64Reference(model)
    return np.concatenate([ref.run({"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def run_old(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnx.reference with only the correctness fixes the reference had before its kernels."""
    batch = chunk(x)
    ev = ReferenceEvaluator(
        float64_model(model), new_ops=[GroupedConvTranspose, InferenceBatchNormalization]
    )
    chunks = [ev.run(None, {"x": x[i : i + batch].astype(np.float64)})[0]
              for i in range(0, len(x), batch)]  # fmt: skip
    return np.concatenate(chunks)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--old-images", type=int, default=8)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"numpy {np.__version__}, onnxruntime {ort.__version__}")  # fmt: skip

    model = export(realistic_statistics(resnet50_like()), 224)
    x = rng.standard_normal((args.images, 3, 224, 224)).astype(np.float32)
    run_ort(model, x[:1])  # warm-up: session build, thread pool
    y32, t_ort = timed(run_ort, model, x, repeat=args.repeat)
    y64, t_new = timed(run_new, model, x, repeat=args.repeat)
    print(f"ResNet-50-like 224x224, {args.images} images (reference in chunks of {chunk(x)}), "
          f"best of {args.repeat}: "
          f"onnxruntime f32 {t_ort:.2f} s, "
          f"float64 reference {t_new:.2f} s ({t_new / t_ort:.1f}x), "
          f"max |f32 - f64| / max(1, max |f64|) = {rel(y32, y64):.2e}")  # fmt: skip
    if not args.skip_old:
        n = args.old_images
        old, t_old = timed(run_old, model, x[:n])
        print(f"  old reference (onnx.reference kernels), {n} images: {t_old:.1f} s "
              f"(new on the same {n}: ~{t_new * n / args.images:.2f} s), "
              f"max |old - new| / max(1, max |old|) = {rel(y64[:n], old):.2e}")  # fmt: skip

    g = export(realistic_statistics(googlenet_like(), seed=1), 112)
    xg = rng.standard_normal((8, 3, 112, 112)).astype(np.float32)
    g32 = run_ort(g, xg)
    g64, t_g = timed(run_new, g, xg)
    print(f"GoogLeNet-like 112x112 (MaxPool ceil_mode, Concat), 8 images: reference {t_g:.2f} s, "
          f"shape {g64.shape} (onnxruntime {g32.shape}), rel diff {rel(g32, g64):.2e}")  # fmt: skip
    try:
        run_old(g, xg)
        print("  old reference: ran")
    except Exception as exc:  # onnx.reference's ceil_mode pool size
        print(f"  old reference: {type(exc).__name__}: {str(exc)[:160]}")


if __name__ == "__main__":
    main()
