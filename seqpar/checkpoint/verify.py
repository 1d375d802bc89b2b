"""Is a checkpoint directory complete, intact and safe to read? (A checkpoint is untrusted input.)"""

from __future__ import annotations

import json
from pathlib import Path

from seqpar.checkpoint.store import FORMAT_VERSION, MANIFEST, MARKER, sha256_file


def verify_checkpoint(path: Path, check_hashes: bool = True) -> list[str]:
    """Problems of one checkpoint (empty list = verified)."""
    try:
        return _verify(Path(path), check_hashes)
    except FileNotFoundError as e:  # deleted by retention while we looked
        return [f"{Path(path).name}: disappeared while verifying ({e.filename})"]


def _verify(path: Path, check_hashes: bool) -> list[str]:
    if not (path / MARKER).is_file():
        return [f"{path.name}: no {MARKER} marker (incomplete write)"]
    if not (path / MANIFEST).is_file():
        return [f"{path.name}: no {MANIFEST}"]
    problems = []
    if (path / MARKER).read_text().strip() != sha256_file(path / MANIFEST):
        problems.append(f"{path.name}: {MANIFEST} does not match the {MARKER} marker")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        return problems + [f"{path.name}: {MANIFEST} unreadable: {e}"]
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"{path.name}: format version {manifest.get('format_version')} != {FORMAT_VERSION}")
    for rel, want in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{path.name}: missing file {rel}")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{path.name}: {rel} has {f.stat().st_size} bytes, manifest says {want['size']}")
        elif check_hashes and sha256_file(f) != want["sha256"]:
            problems.append(f"{path.name}: {rel} checksum mismatch (corrupt)")
    return problems
