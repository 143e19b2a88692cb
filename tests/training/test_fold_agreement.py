"""The two folds agree: `fold_batchnorm` (torch.fx, for PyTorch users) and the ONNX fold every
bundle is made with (`bnfold.toolchain.fold`, on the model training exports with its BNs kept).

Same decisions per BN (folded or not, direction, target layer) and bit-identical folded weights:
both compute `bnfold.foldmath` in float64 and round once to float32, so any difference is a bug
in one of the two wrappers, not rounding. Their outputs are compared too (torch vs onnxruntime
float32 kernels: a few ulps of the logit scale).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from bnfold.toolchain.fold import fold_onnx
from tests.training.test_fold import randomize_bn
from training.export import export_onnx, name_nodes_by_module
from training.fold import fold_batchnorm
from training.model import ModelConfig, build_model


class Mixed(nn.Module):
    """What the digits nets lack: grouped conv, ConvTranspose, a BN after the activation in
    front of a reflect-padded conv (its Pad copies BN outputs: the shift folds exactly), a BN
    after the activation in front of a zero-padded conv (refused), Linear + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn3 = nn.BatchNorm2d(6)
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.bn4 = nn.BatchNorm2d(6)
        self.zero_padded = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.bn5 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.grouped(x)))
        x = self.bn3(torch.relu(self.up(x)))  # after the activation: forward into `reflect`
        x = self.bn4(torch.relu(self.reflect(x)))  # forward into a zero-padded conv: refused
        x = self.zero_padded(x).mean((2, 3))
        return self.head(torch.relu(self.bn5(self.fc(x))))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial statistics, some scales negative, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m, g, var_range=(-1.0, 1.0))
    return model.eval()


MODELS = {
    "pre": lambda: build_model(ModelConfig(widths=[8, 16], hidden=16)),
    "post-residual": lambda: build_model(
        ModelConfig(widths=[8, 16], hidden=16, residual=True, bn_placement="post")
    ),
    "mixed": Mixed,
}
INPUTS = {"pre": (1, 8), "post-residual": (1, 8), "mixed": (3, 12)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fx_and_onnx_folds_agree(kind):
    torch.manual_seed(0)
    model = randomized(MODELS[kind](), seed=1)
    channels, side = INPUTS[kind]
    x = torch.randn(16, channels, side, side, generator=torch.Generator().manual_seed(2))
    folded_gm, fx_report = fold_batchnorm(model)
    unfolded = export_onnx(model, x[:2])
    name_nodes_by_module(unfolded)
    folded_onnx, onnx_report = fold_onnx(unfolded)

    def decisions(report):
        return {r.bn: (r.folded, r.direction, r.into) for r in report.rows}

    assert decisions(fx_report) == decisions(onnx_report)
    assert any(r.folded for r in fx_report.rows) and fx_report.rows  # something to compare

    inits = {t.name: numpy_helper.to_array(t) for t in folded_onnx.graph.initializer}
    nodes = {n.name: n for n in folded_onnx.graph.node}
    for row in fx_report.folded:
        layer = folded_gm.get_submodule(row.into)
        node = nodes[row.into]
        weight = inits[node.input[1]]
        if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node)):
            weight = weight.T  # stored (in, out); torch's Linear holds (out, in)
        np.testing.assert_array_equal(weight, layer.weight.detach().numpy())
        bias = _bias(folded_onnx, node, inits)
        np.testing.assert_array_equal(bias, layer.bias.detach().numpy())

    with torch.no_grad():
        want = folded_gm(x).numpy()
    got = ort.InferenceSession(folded_onnx.SerializeToString()).run(None, {"input": x.numpy()})[0]
    # float32 kernels of two libraries on a handful of layers: 1e-5 of the scale is ~80 ulps
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def _bias(model, node, inits) -> np.ndarray:
    """A Conv/Gemm's bias input, or the constant a MatMul's sole Add adds."""
    if len(node.input) > 2:
        return inits[node.input[2]]
    (add,) = [n for n in model.graph.node if node.output[0] in n.input]
    assert add.op_type == "Add"
    (const,) = [name for name in add.input if name in inits]
    return inits[const]


def _trans_b(node) -> int:
    return next((a.i for a in node.attribute if a.name == "transB"), 0)


def test_the_reflect_padded_forward_fold_happens_in_both():
    model = randomized(Mixed(), seed=3)
    _, report = fold_batchnorm(model)
    rows = {r.bn: (r.folded, r.direction, r.into, r.reason or "") for r in report.rows}
    assert rows["bn3"][:3] == (True, "forward", "reflect")
    assert not rows["bn4"][0] and "zero-padded" in rows["bn4"][3]
