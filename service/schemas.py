"""Request and response bodies of the HTTP API, with the examples /docs shows.

pydantic only, no FastAPI: the V2 codec validates inference requests with these models too.
Manifest parts (input spec, fold rows, equivalence report) are reused from `bnfold.bundle`,
the one schema of the bundle format.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from bnfold.bundle import (
    BnStatisticsCheck,
    FoldRow,
    ImportRecord,
    InputSpec,
    LayerDiff,
    OutputSpec,
    Quantization,
    Recalibration,
)

ParameterValue = bool | int | float | str
Parameters = dict[str, ParameterValue]
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
]  # fmt: skip

DIGIT_ROW = [[[-0.75] * 8] * 8]  # one (1, 8, 8) image of the digits model, background only


def _examples(*examples: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    model_config = _examples({"error": "unknown model 'cats'; models served here: digits"})
    error: str = Field(description="What went wrong and what to send instead.")


# ---------------------------------------------------------------- Open Inference Protocol (V2)


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    model_config = _examples(
        {"name": "bnfold", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    )
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable dimension (the batch).")


class ModelMetadata(BaseModel):
    model_config = _examples(
        {
            "name": "digits",
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        }
    )
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    """One input tensor: `data` row-major (flat or nested), or binary after the JSON header."""

    name: str
    shape: list[Annotated[StrictInt, Field(ge=0)]]
    datatype: Datatype
    parameters: Parameters | None = Field(
        None, description="`binary_data_size`: byte length of this tensor's binary data."
    )
    data: list[Any] | None = Field(None, description="Numbers, flat or nested as the shape.")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        None, description="`binary_data`: true to answer this output as binary data."
    )


class InferenceRequest(BaseModel):
    """POST /v2/models/{model}/infer (also the tensor form of /v1/models/{model}/compare)."""

    model_config = _examples(
        {
            "id": "42",
            "parameters": {"variant": "folded"},
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [DIGIT_ROW]}],
            "outputs": [{"name": "logits"}],
        }
    )  # fmt: skip
    id: str | None = None
    parameters: Parameters | None = Field(
        None,
        description="`variant`: 'folded' (default), 'unfolded', or 'int8' when the bundle has "
        "it; `binary_data_output`: true to answer every output as binary data.",
    )
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_config = _examples(
        {
            "model_name": "digits",
            "model_version": "1",
            "id": "42",
            "parameters": {"variant": "folded"},
            "outputs": [{"name": "logits", "shape": [1, 10], "datatype": "FP32",
                         "data": [-1.2, 0.3, -0.8, 1.1, -2.0, 0.4, -0.1, 0.0, 2.7, -0.5]}],
        }
    )  # fmt: skip
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


# ---------------------------------------------------------------- bnfold API (/v1)


class ClassProbability(BaseModel):
    label: str = Field(description="Class name from the bundle.")
    index: int = Field(description="Class index (position in the logits).")
    probability: float = Field(description="Softmax probability, computed in float64.")


class Prediction(ClassProbability):
    """The top class of one image, and the k most likely classes."""

    filename: str | None = Field(None, description="Uploaded file name, when there was one.")
    top_k: list[ClassProbability]


class PredictResponse(BaseModel):
    model_config = _examples(
        {
            "model_name": "digits",
            "model_version": "1",
            "variant": "folded",
            "predictions": [
                {"label": "3", "index": 3, "probability": 0.998, "filename": "three.png",
                 "top_k": [{"label": "3", "index": 3, "probability": 0.998},
                           {"label": "9", "index": 9, "probability": 0.001}]}
            ],
        }
    )  # fmt: skip
    model_name: str
    model_version: str
    variant: str = Field(description="The variant that ran: 'folded', 'unfolded', or another file "
                         "the bundle lists.")  # fmt: skip
    predictions: list[Prediction] = Field(description="One per image, in request order.")


class ModelSummary(BaseModel):
    name: str
    version: str | None
    status: Literal["ready", "failed"]
    error: str | None = Field(None, description="Why the bundle is not served.")
    classes: list[str] | None = None
    variants: list[str] = Field(default_factory=list, description="The variants served.")
    variant_errors: dict[str, str] = Field(
        default_factory=dict, description="Variants the bundle lists but this server refused, why."
    )


class ModelList(BaseModel):
    model_config = _examples(
        {"models": [{"name": "digits", "version": "1", "status": "ready", "error": None,
                     "classes": [str(i) for i in range(10)]}]}
    )  # fmt: skip
    models: list[ModelSummary]


class ModelFile(BaseModel):
    path: str
    sha256: str
    batchnorm_nodes: int
    opset: int
    graph_optimization: str = Field(description="onnxruntime graph optimization level used.")
    quantization: Quantization | None = Field(
        None, description="int8 only: settings used and node counts."
    )


class FoldSummary(BaseModel):
    folded: int = Field(description="BatchNorm layers folded into a neighbouring layer.")
    refused: int = Field(description="BatchNorm layers kept as BatchNormalization nodes.")
    layers: list[FoldRow]


class VariantEngine(BaseModel):
    """What computes one served variant on this server."""

    engine: Literal["onnxruntime", "openvino"]
    precision: Literal["float32", "int8", "bf16"]
    cpu_features: list[str] = Field(description="The CPU's instruction-set flags that matter.")


class ModelDetail(ModelSummary):
    """What a client needs to call the model, and where its numbers come from."""

    created: str | None = None
    input: InputSpec | None = None
    output: OutputSpec | None = None
    providers: list[str] = Field(
        default_factory=list, description="Active onnxruntime execution providers, in order."
    )
    files: dict[str, ModelFile] = Field(default_factory=dict)
    fold_summary: FoldSummary | None = None
    equivalence_passed: bool | None = Field(None, description="Export-time verdict.")
    per_layer_available: bool = False
    per_layer_note: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    training: dict = Field(default_factory=dict)
    imported: ImportRecord | None = Field(
        None, description="For a model brought in by `bnfold import`: its source and changes."
    )
    engines: dict[str, VariantEngine] = Field(
        default_factory=dict, description="Each served variant's engine, precision and CPU."
    )
    unavailable_variants: dict[str, str] = Field(
        default_factory=dict,
        description="Variants this server cannot offer on its CPU or engine (bf16), and why.",
    )
    bn_statistics: BnStatisticsCheck | None = Field(
        None, description="The BN running statistics checked against data at export or import."
    )
    recalibration: Recalibration | None = Field(
        None, description="Set when the BN statistics were re-estimated before folding."
    )


class Int8Comparison(BaseModel):
    """int8 vs folded float32 on the same inputs. int8 is judged by agreement with folded (the
    criterion it passed at export), not by a float32 tolerance."""

    predictions: list[Prediction]
    max_abs_diff: float = Field(description="max |int8 - folded| over all logits.")
    mean_abs_diff: float
    top1_agreement: float = Field(description="Fraction of these images with folded's top class.")
    min_top1_agreement: float | None = Field(None, description="The export criterion.")
    export_top1_agreement: float | None = Field(
        None, description="Agreement measured at export on the held-out split."
    )


class CompareResponse(BaseModel):
    """Folded vs unfolded on the same inputs, run now by this server."""

    model_name: str
    model_version: str
    n_images: int
    folded: list[Prediction]
    unfolded: list[Prediction]
    max_abs_diff: float = Field(description="max |folded - unfolded| over all logits.")
    mean_abs_diff: float
    max_rel_diff: float = Field(description="max_abs_diff / max |unfolded logit|.")
    top1_agreement: float = Field(description="Fraction of images with the same top class.")
    tolerance_abs: float = Field(description="The bundle's pass threshold on max_abs_diff.")
    within_tolerance: bool
    per_layer: list[LayerDiff] = Field(
        description="Each folded layer's output vs the matching BN output of the unfolded model."
    )
    per_layer_note: str | None = Field(None, description="Why per_layer is empty, if it is.")
    int8: Int8Comparison | None = Field(None, description="When the bundle serves int8.")
    int8_note: str | None = Field(None, description="Why int8 is absent, if it is.")
