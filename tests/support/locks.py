"""The image's dependency locks (packaging/image-*requirements.txt, made by scripts/lock-image-deps.sh)."""

from __future__ import annotations

import re
from pathlib import Path


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256 hashes])} of a pip-compile --generate-hashes file; any other line fails."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?: --hash=sha256:[0-9a-f]{64})+)", line)
            if not match:
                raise AssertionError(f"{path.name}: not an exact pin with hashes: {line}")
            pins[normalize(match[1])] = (match[2], re.findall(r"[0-9a-f]{64}", match[3]))
    return pins
