"""Print the requirements of pyproject.toml's base dependencies plus the given extras.

The Docker image installs dependencies from this output before it copies the code, so a code
change does not invalidate the dependency layer; the image-closure test runs the same script.
`--gpu` swaps onnxruntime for onnxruntime-gpu (same module, CUDA execution provider).

    python scripts/requirements_from_pyproject.py serve [--gpu] > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str], gpu: bool = False) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += [r for r in _expand(project["name"], optional, extra) if r not in reqs]
    if gpu:
        reqs = [re.sub(r"^onnxruntime(?=[<>=!~ ;\[]|$)", "onnxruntime-gpu", r) for r in reqs]
    return reqs


def _expand(name: str, optional: dict, extra: str) -> list[str]:
    """An extra's requirements, with the project's own extras it names ("bnfold[toolchain]")
    replaced by their requirements: pip resolves those, a requirements file cannot."""
    out = []
    for req in optional[extra]:
        own = re.fullmatch(rf"{re.escape(name)}\[([\w,-]+)\]", req.strip())
        if own is None:
            out.append(req)
            continue
        for inner in own.group(1).split(","):
            out += _expand(name, optional, inner)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras to include, e.g. serve")
    parser.add_argument("--gpu", action="store_true", help="use onnxruntime-gpu")
    parser.add_argument(
        "--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml"
    )
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.extras, args.gpu)))


if __name__ == "__main__":
    main()
