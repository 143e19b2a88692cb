"""A small Dockerfile reader for tests: instructions per stage, continuation lines joined."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            for token in shlex.split(arg):
                key, _, value = token.partition("=")
                out[key] = value
        return out


def exec_form(arg: str) -> list[str]:
    """CMD ["a", "b"] -> ["a", "b"]; shell form is refused (signals would not reach the server)."""
    assert arg.lstrip().startswith("["), f"expected exec form, got {arg!r}"
    return json.loads(arg)


def parse(path: Path) -> list[Stage]:
    lines, buf = [], ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arg = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = arg.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, arg.strip()))
    return stages


def healthcheck_command(stage: Stage) -> list[str]:
    arg = stage.last("HEALTHCHECK")
    return exec_form(arg[arg.index("CMD") + len("CMD") :])
