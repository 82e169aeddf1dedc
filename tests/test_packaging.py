"""Packaging rules: declared dependencies agree, the public API is what __all__ says, and the
sans-I/O layers stay free of I/O imports."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import qsftp

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_packages_as_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    conda: set[str] = set()
    section = ""
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if re.match(r"^[a-z]", line):
            section = line.split(":", 1)[0]
        match = re.match(r"^  - ([A-Za-z0-9_.\-]+)", line)  # top-level list items only
        if section == "dependencies" and match:
            conda.add(_name(match.group(1)))
    conda -= {"python", "pip"}
    assert conda == declared


def test_all_is_sorted_and_every_name_resolves() -> None:
    assert qsftp.__all__ == sorted(qsftp.__all__)
    assert set(qsftp.__all__) == {*qsftp._EXPORTS, "__version__"}
    for name in qsftp.__all__:
        assert getattr(qsftp, name) is not None


def test_public_api_names() -> None:
    expected = {"serve", "upload", "download", "listdir", "connect", "TransferResult"}
    assert expected <= set(qsftp.__all__)
    assert issubclass(qsftp.TrustError, qsftp.QsftpError)


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("qsftp.wire", ["asyncio", "socket", "aioquic", "pandas"]),
        ("qsftp.protocol", ["asyncio", "socket", "aioquic", "pandas"]),
        ("qsftp.errors", ["asyncio", "socket", "aioquic", "pandas"]),
        ("qsftp.fs", ["asyncio", "aioquic", "pandas"]),
        ("qsftp.netem", ["aioquic", "pandas", "matplotlib"]),
        ("qsftp.packetlink", ["aioquic", "pandas", "matplotlib", "qh3"]),
        ("qsftp.server", ["pandas", "matplotlib", "qh3"]),
        ("qsftp.client", ["pandas", "matplotlib", "qh3"]),
    ],
)
def test_layers_import_only_what_they_may(module: str, forbidden: list[str]) -> None:
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in {forbidden!r} if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{module} imported {proc.stdout.strip()} {proc.stderr}"
