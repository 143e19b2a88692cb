"""The gRPC code is generated from service/grpc/inference.proto, and the .proto is the
published protocol: every message and RPC we define matches Triton's definition field for
field (tritonclient.grpc's descriptors are the independent reference)."""

from __future__ import annotations

import tempfile
from importlib.resources import files
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc
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


def test_every_message_and_rpc_matches_the_published_definition():
    ours = our_descriptor()
    theirs = descriptor_pb2.FileDescriptorProto()
    triton.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    published = {m.name: m for m in theirs.message_type}
    for message in ours.message_type:
        reference = published[message.name]
        assert fields(message) == fields(reference), message.name
        nested = {n.name: n for n in reference.nested_type}
        for inner in message.nested_type:
            assert fields(inner) == fields(nested[inner.name]), f"{message.name}.{inner.name}"
    (service,) = ours.service
    (reference_service,) = theirs.service
    assert service.name == reference_service.name == "GRPCInferenceService"
    methods = {m.name: (m.input_type, m.output_type) for m in reference_service.method}
    ours_methods = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert {k: methods[k] for k in ours_methods} == ours_methods
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "RepositoryIndex", "RepositoryModelLoad",
            "RepositoryModelUnload"} == set(ours_methods)  # fmt: skip
