"""The gRPC code is generated from service/grpc/inference.proto, and the .proto is the
published protocol: every message and RPC we define matches Triton's definition field for
field (tritonclient.grpc's descriptors are the independent reference)."""

from __future__ import annotations

import tempfile
from importlib.resources import files
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton

from service.grpc.generate import PROTO, ROOT, stale_files


def test_the_committed_generated_code_equals_a_fresh_generation():
    assert stale_files() == []  # else: python -m service.grpc.generate


def our_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Our .proto compiled to a descriptor, without loading it into protobuf's pool."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        well_known = files("grpc_tools") / "_proto"
        args = ["protoc", f"-I{ROOT}", f"-I{well_known}", f"--descriptor_set_out={out}",
                str(ROOT / PROTO)]  # fmt: skip
        assert protoc.main(args) == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


def fields(message) -> dict[str, tuple[int, int, int, str]]:
    return {f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1])
            for f in message.field}  # fmt: skip


# Messages of which we define only the fields bnfold fills: each of those must still be the
# published one (same number, type, label and message type), so clients parse them unchanged.
# ModelStatistics: no memory_usage or response_stats (decoupled models' responses); the rest:
# Triton's model_config.proto, far larger than what a bundle has to say.
SUBSETS = {"ModelStatistics", "ModelConfig", "ModelInput", "ModelOutput", "ModelInstanceGroup",
           "ModelDynamicBatching"}  # fmt: skip


def published_descriptors() -> tuple[dict, dict]:
    """Triton's messages and enums by name: its service .proto and its model_config.proto."""
    messages, enums = {}, {}
    for module in (triton, triton_config):
        theirs = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(theirs)
        assert theirs.package == "inference"
        messages.update({m.name: m for m in theirs.message_type})
        enums.update({e.name: e for e in theirs.enum_type})
    return messages, enums


def test_every_message_and_rpc_matches_the_published_definition():
    ours = our_descriptor()
    theirs = descriptor_pb2.FileDescriptorProto()
    triton.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    published, published_enums = published_descriptors()
    for message in ours.message_type:
        reference = published[message.name]
        mine, want = fields(message), fields(reference)
        if message.name in SUBSETS:
            want = {name: want[name] for name in mine if name in want}
        assert mine == want, message.name
        nested = {n.name: n for n in reference.nested_type}
        for inner in message.nested_type:
            assert fields(inner) == fields(nested[inner.name]), f"{message.name}.{inner.name}"
        nested_enums = {e.name: e for e in reference.enum_type}
        for enum in message.enum_type:
            assert enum == nested_enums[enum.name], f"{message.name}.{enum.name}"
    for enum in ours.enum_type:
        assert enum == published_enums[enum.name], enum.name
    (service,) = ours.service
    (reference_service,) = theirs.service
    assert service.name == reference_service.name == "GRPCInferenceService"
    methods = {m.name: (m.input_type, m.output_type) for m in reference_service.method}
    ours_methods = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert {k: methods[k] for k in ours_methods} == ours_methods
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
            "RepositoryModelLoad", "RepositoryModelUnload"} == set(ours_methods)  # fmt: skip
