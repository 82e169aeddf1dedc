"""Shared helpers for the tests (imported by name: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from qsftp import fs

# Every asyncio test body is bounded: a hang fails instead of stalling CI.
TIMEOUT = 60


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(body(), TIMEOUT)

    return asyncio.run(bounded())


def make_file(path: Path, size: int, seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    path.write_bytes(rng.randbytes(size))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(fs.PARTIAL_SUFFIX)]
