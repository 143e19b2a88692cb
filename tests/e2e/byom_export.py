"""Models users bring, built and exported the way their frameworks do it, in a child process.

    python -m tests.e2e.byom_export torch OUT_DIR    # PyTorch, dynamo exporter, BN kept
    python -m tests.e2e.byom_export keras OUT_DIR    # Keras 3 AlexNet-with-BN, scaled down

Each writes OUT_DIR/model.onnx (torch: plus model.onnx.data, the exporter's side file, and
model_ts13.onnx from the TorchScript exporter at opset 13), x.npy
(a test batch in the model's layout) and ref64.npy: the framework's own float64 answer on x,
the independent reference for the imported bundle. Running in a child keeps TensorFlow and
torch out of the test process (import cost, threads, memory).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

SEED = 0


def _random_bn(rng, gamma, beta, mean, var) -> list[np.ndarray]:
    """Statistics a trained BN has (not the identity a fresh one starts as)."""
    return [
        rng.uniform(0.5, 2.0, gamma.shape),
        rng.normal(0, 0.5, beta.shape),
        rng.normal(0, 0.5, mean.shape),
        rng.uniform(0.2, 3.0, var.shape),
    ]


def export_torch(out: Path) -> None:
    """conv -> BN -> ReLU, conv -> ReLU -> BN (folds forward: the next conv is unpadded),
    Linear -> BatchNorm1d -> ReLU, Linear logits; NCHW 3x16x16, 4 classes."""
    import torch
    from torch import nn

    class SmallCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv3 = nn.Conv2d(8, 16, 3, stride=2)  # no padding
            self.fc, self.bn3 = nn.Linear(16 * 7 * 7, 32), nn.BatchNorm1d(32)
            self.head = nn.Linear(32, 4)

        def forward(self, x):  # (N, 3, 16, 16) -> (N, 4)
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.bn2(torch.relu(self.conv2(x)))
            x = torch.relu(self.conv3(x))
            return self.head(torch.relu(self.bn3(self.fc(x.flatten(1)))))

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = SmallCNN().eval()
    for bn in (model.bn1, model.bn2, model.bn3):
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        values = _random_bn(rng, *(t.detach().numpy() for t in tensors))
        for t, v in zip(tensors, values, strict=True):
            t.data.copy_(torch.from_numpy(v.astype(np.float32)))
    x = rng.uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32)
    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(out / "model.onnx"), dynamo=True, optimize=False,
        input_names=["image"], dynamic_shapes={"x": {0: "batch"}}, verbose=False,
    )  # fmt: skip
    # TorchScript at opset 13, BN kept (it sets momentum, which onnx.reference once misread)
    torch.onnx.export(
        model, (torch.from_numpy(x[:2]),), str(out / "model_ts13.onnx"), dynamo=False,
        opset_version=13, training=torch.onnx.TrainingMode.PRESERVE, input_names=["image"],
        dynamic_axes={"image": {0: "batch"}},
    )  # fmt: skip
    with torch.no_grad():
        ref64 = model.double()(torch.from_numpy(x).double()).numpy()
    np.save(out / "x.npy", x)
    np.save(out / "ref64.npy", ref64)


def _alexnet_bn(keras, dtype: str):
    """AlexNet's shape with BN after every conv and dense layer, scaled down to 32x32x3."""
    from keras import layers

    def conv_bn(x, filters, kernel, strides=1):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", dtype=dtype)(x)
        return layers.ReLU(dtype=dtype)(layers.BatchNormalization(dtype=dtype)(x))

    inputs = keras.Input((32, 32, 3), dtype=dtype)
    x = layers.MaxPooling2D(2, dtype=dtype)(conv_bn(inputs, 16, 5, strides=2))  # (8, 8, 16)
    x = layers.MaxPooling2D(2, dtype=dtype)(conv_bn(x, 24, 3))  # (4, 4, 24)
    x = conv_bn(conv_bn(x, 32, 3), 32, 3)
    x = layers.Flatten(dtype=dtype)(x)
    for units in (64, 64):
        x = layers.Dense(units, dtype=dtype)(x)
        x = layers.ReLU(dtype=dtype)(layers.BatchNormalization(dtype=dtype)(x))
    return keras.Model(inputs, layers.Dense(10, dtype=dtype)(x))  # logits, no softmax


def export_keras(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    rng = np.random.default_rng(SEED)
    keras.utils.set_random_seed(SEED)
    model = _alexnet_bn(keras, "float32")
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights(_random_bn(rng, *weights))
        elif len(weights) == 2:  # conv/dense: a non-zero bias (zero ones get optimized away)
            layer.set_weights([weights[0], rng.normal(0, 0.3, weights[1].shape)])
    x = rng.uniform(0, 1, (8, 32, 32, 3)).astype(np.float32)
    model(x[:1])  # export needs a model that has been called
    model.export(str(out / "model.onnx"), format="onnx", verbose=False)
    model64 = _alexnet_bn(keras, "float64")
    model64.set_weights([w.astype(np.float64) for w in model.get_weights()])
    np.save(out / "x.npy", x)
    np.save(out / "ref64.npy", np.asarray(model64(x.astype(np.float64)), dtype=np.float64))


def main(argv: list[str]) -> int:
    kind, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    {"torch": export_torch, "keras": export_keras}[kind](out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
