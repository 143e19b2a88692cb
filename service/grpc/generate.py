"""`python -m service.grpc.generate [--check]`: the gRPC Python code, from inference.proto.

The generated modules (inference_pb2.py, inference_pb2.pyi, inference_pb2_grpc.py) are
committed, so installing and serving need only grpcio and protobuf, never grpcio-tools (a dev
dependency). This command writes them with grpcio-tools' protoc; `--check` regenerates into a
temporary folder and exits 1 when the committed files differ (tests/service/test_grpc_codegen.py
runs the same comparison), so the code can never drift from the .proto or be edited by hand.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `service` package
PROTO = "service/grpc/inference.proto"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on PROTO with output under out_root/service/grpc/; the files written."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    (out_root / "service" / "grpc").mkdir(parents=True, exist_ok=True)
    outputs = [f"--{kind}_out={out_root}" for kind in ("python", "pyi", "grpc_python")]
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}", *outputs, str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "service" / "grpc" / name for name in GENERATED]


def stale_files() -> list[str]:
    """Generated files that differ from a fresh generation (empty when all are current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = ROOT / "service" / "grpc"
        return [
            p.name
            for p in fresh
            if not (committed / p.name).is_file()
            or (committed / p.name).read_bytes() != p.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.grpc.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_files()
            if stale:
                print(f"generated gRPC code is stale: {', '.join(stale)}; run "
                      "`python -m service.grpc.generate`", file=sys.stderr)  # fmt: skip
                return 1
            return 0
        for path in generate(ROOT):
            print(path.relative_to(ROOT))
    except ImportError:
        print("grpcio-tools is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
