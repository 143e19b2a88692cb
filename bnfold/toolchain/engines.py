"""Inference engines beside onnxruntime: OpenVINO's CPU plugin, at float32 or bfloat16.

A session from here answers the calls the rest of bnfold makes on an onnxruntime session
(`run(output_names, feeds)`, `get_inputs()`, `get_outputs()`, `get_providers()`), so the
data plane runs either engine the same way.

Precision is always stated, never left to the plugin: OpenVINO's CPU plugin infers in bfloat16
by default on CPUs that compute it natively (AMX-BF16, AVX512-BF16), which would silently change
the numbers a float32 variant was proved with. Whether the CPU computes bf16 natively is asked
of the plugin (its OPTIMIZATION_CAPABILITIES), not guessed from the CPU's name.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"
PRECISION_HINT = {"float32": "f32", "bf16": "bf16"}
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


class EngineUnavailable(RuntimeError):
    """The engine or the precision asked for cannot run here; the message says why."""


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The instruction-set flags (of CPU_FLAGS) this CPU reports in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return tuple(f for f in CPU_FLAGS if f in flags)


@functools.cache
def openvino_capabilities() -> tuple[str, ...] | None:
    """OpenVINO CPU plugin's OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8), None when
    openvino is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively, as OpenVINO's CPU plugin reports it."""
    caps = openvino_capabilities()
    return caps is not None and "BF16" in caps


def bf16_unavailable_reason() -> str | None:
    """Why a bf16 variant cannot be served here, or None when it can."""
    if openvino_capabilities() is None:
        return "bf16 runs on OpenVINO, which is not installed here (pip install 'bnfold[openvino]')"
    if not native_bf16():
        return (
            "this CPU does not compute bfloat16 natively (OpenVINO reports "
            f"{', '.join(openvino_capabilities() or ())}); bf16 would be emulated, slower "
            "than float32"
        )
    return None


@dataclass(frozen=True)
class _Tensor:
    """What `get_inputs()` / `get_outputs()` items offer: a name."""

    name: str


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO's CPU plugin at a stated precision."""

    def __init__(self, model: Path | bytes, precision: str = "float32", threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise EngineUnavailable(
                "engine 'openvino' is not installed here: pip install 'bnfold[openvino]'"
            ) from None
        if precision not in PRECISION_HINT:
            raise ValueError(
                f"Invalid precision {precision!r}. Only float32 and bf16 are supported."
            )
        if precision == "bf16" and (reason := bf16_unavailable_reason()):
            raise EngineUnavailable(reason)
        core = ov.Core()
        source = core.read_model(str(model)) if isinstance(model, Path) else core.read_model(
            model=bytes(model), weights=b""
        )  # fmt: skip
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINT[precision],
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(source, "CPU", config)
        self.precision = precision
        self._local = threading.local()

    @property
    def inference_precision(self) -> str:
        """The precision the compiled model really infers in, as OpenVINO reports it."""
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def get_inputs(self) -> list[_Tensor]:
        return [_Tensor(p.get_any_name()) for p in self.compiled.inputs]

    def get_outputs(self) -> list[_Tensor]:
        return [_Tensor(p.get_any_name()) for p in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return [f"OpenVINO CPU ({self.precision})"]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """onnxruntime's call: the named outputs (all when None) for the feeds; one infer request
        per calling thread, so concurrent runs never share one."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer(feeds)
        by_name = {port.get_any_name(): value for port, value in result.items()}
        names = output_names or [o.name for o in self.get_outputs()]
        return [np.array(by_name[n], copy=True) for n in names]
