"""Is a checkpoint directory complete, intact and safe to read? (A checkpoint is untrusted input.)

Every name a checkpoint supplies (manifest entries, ``latest``, the HF shard index) goes through
``safe_member`` before it is joined to a directory, the manifest is validated (``Manifest``), and
the manifest must describe the directory exactly: no file it does not list, no symlink, nothing
but regular files and directories. ``verify_checkpoint`` never raises: it returns problems.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seqpar.checkpoint.store import LATEST, MANIFEST, MARKER, SUPERSEDED, CheckpointStore, parse_tag, sha256_file
from seqpar.errors import UserError

SUPPORTED_VERSIONS = {1, 2}
MAX_SMALL_FILE = 1 << 20  # marker and ``latest`` are one line; refuse to read a planted huge file
MAX_MANIFEST = 1 << 28  # ~100 bytes a file: far beyond any real checkpoint, short of exhausting memory
_RANK_DIR = re.compile(r"^rank\d+/")


class UnsafePath(ValueError):
    """A name from a checkpoint that would leave its directory or go through a symlink."""


def safe_member(root: Path, rel: str, *, symlinks: bool = False) -> Path:
    """``root / rel`` for a relative POSIX name that stays inside ``root``; else ``UnsafePath``.

    Refused: non-strings, absolute names, empty / ``.`` / ``..`` components, backslashes, NUL,
    a symlink anywhere below ``root`` (the file itself included) and a resolved path outside
    ``root``. The path need not exist. ``symlinks=True`` keeps only the name checks, for
    directories that are symlink farms by design (Hugging Face cache snapshots).
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePath(f"{rel!r} is not a file name")
    if "\\" in rel or "\0" in rel:
        raise UnsafePath(f"{rel!r}: backslash or NUL in a file name")
    if rel.startswith("/") or PurePosixPath(rel).is_absolute():
        raise UnsafePath(f"{rel!r} is an absolute path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"{rel!r} has an empty, '.' or '..' component")
    root = Path(root)
    out = root.joinpath(*parts)
    if symlinks:
        return out
    cur = root
    for p in parts:
        cur = cur / p
        if cur.is_symlink():
            raise UnsafePath(f"{rel!r} goes through a symlink ({cur.relative_to(root).as_posix()})")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(out)]) != real_root:
        raise UnsafePath(f"{rel!r} resolves outside {root}")
    return out


def read_latest(root: Path) -> str | None:
    """The tag named by ``<root>/latest``, or None when there is no usable one.

    None when the file is missing, not a regular file (a symlink included), unreadable, or does
    not hold one plain name (no ``/``, ``\\``, NUL, leading dot) that ``parse_tag`` accepts. It is
    a hint: the tag's directory may not exist (callers check).
    """
    f = Path(root) / LATEST
    try:
        st = os.lstat(f)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SMALL_FILE:
            return None
        name = f.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or any(c.isspace() for c in name):
        return None
    return name if parse_tag(name) is not None else None


# -- manifest ------------------------------------------------------------------------------------
NonNegInt = Annotated[int, Field(ge=0)]


class FileEntry(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    size: NonNegInt
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Position(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    consumed_samples: NonNegInt
    step: NonNegInt
    micro_step: NonNegInt
    window_samples: NonNegInt | None = None  # format 2: sequences done in the open window


class Manifest(BaseModel):
    """``manifest.json``; meta keys beyond these are allowed (and kept in ``model_extra``)."""

    model_config = ConfigDict(strict=True, extra="allow")
    format_version: int
    tag: str
    created: float | None = None
    config_hash: str | None = None
    topology: dict[str, Any] | None = None
    optimizer_kind: str | None = None
    versions: dict[str, Any] | None = None
    position: Position | None = None
    files: dict[str, FileEntry]

    @model_validator(mode="after")
    def _version(self) -> "Manifest":
        if self.format_version not in SUPPORTED_VERSIONS:
            raise ValueError(f"format version {self.format_version} is not supported "
                             f"(this seqpar reads {sorted(SUPPORTED_VERSIONS)})")
        if self.format_version >= 2 and self.position is None:
            raise ValueError(f"format version {self.format_version} requires 'position'")
        return self


def _parse_manifest(data: bytes) -> tuple[Manifest | None, list[str]]:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:  # ValueError covers bad UTF-8 and bad JSON
        return None, [f"{MANIFEST} unreadable: {e}"]
    try:
        return Manifest.model_validate(raw), []
    except ValidationError as e:
        errs = e.errors()
        out = [f"{MANIFEST}: {'.'.join(map(str, err['loc'])) or 'top level'}: {err['msg'].removeprefix('Value error, ')}"
               for err in errs[:8]]
        return None, out + ([f"{MANIFEST}: ... and {len(errs) - 8} more"] if len(errs) > 8 else [])


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """Bytes of a regular file (not a symlink): FileNotFoundError / ValueError otherwise."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path.name} is not a regular file")
    if limit is not None and st.st_size > limit:
        raise ValueError(f"{path.name} is {st.st_size} bytes, too large")
    return path.read_bytes()


def load_manifest(path: Path) -> tuple[Manifest | None, list[str]]:
    """(manifest, problems) of a checkpoint directory (or its ``manifest.json``); never raises."""
    path = Path(path)
    f = path if path.name == MANIFEST and not path.is_dir() else path / MANIFEST
    try:
        return _parse_manifest(_read_regular(f, MAX_MANIFEST))
    except FileNotFoundError:
        return None, [f"no {MANIFEST}"]
    except Exception as e:  # untrusted input: report, never crash the caller
        return None, [f"{MANIFEST} unreadable: {e}"]


# -- verification --------------------------------------------------------------------------------
def verify_checkpoint(path: Path, check_hashes: bool = True, only: Callable[[str], bool] | None = None) -> list[str]:
    """Problems of one checkpoint (empty list = verified); never raises.

    ``only(rel)`` picks the manifest files whose size, sha256 and content structure are checked
    (each rank checks the files it reads); marker, manifest, names, and that the directory holds
    exactly the listed files are checked for all. Content checks (safetensors header, codec
    skeleton via ``codec.check_skeleton`` when it exists) run on files that passed.
    """
    path = Path(path)
    try:
        return [f"{path.name}: {p}" for p in _verify(path, check_hashes, only)]
    except FileNotFoundError as e:  # deleted by retention while we looked
        return [f"{path.name}: disappeared while verifying ({e.filename})"]
    except Exception as e:  # any content must give an answer, not abort a resume
        return [f"{path.name}: cannot verify: {type(e).__name__}: {e}"]


def _tag_matches(path: Path, tag: str) -> bool:
    # superseded/ keeps a moved checkpoint as <tag> or <tag>.<n> (store.set_aside_newer)
    return path.name == tag or (path.parent.name == SUPERSEDED and re.fullmatch(re.escape(tag) + r"\.\d+", path.name) is not None)


def _verify(path: Path, check_hashes: bool, only: Callable[[str], bool] | None) -> list[str]:
    if path.is_symlink():
        return ["the checkpoint directory is a symlink"]
    if not path.is_dir():
        return ["not a directory" if path.exists() else "does not exist"]
    try:
        marker = _read_regular(path / MARKER, MAX_SMALL_FILE)
    except FileNotFoundError:
        return [f"no {MARKER} marker (incomplete write)"]
    except ValueError as e:
        return [f"unusable {MARKER} marker: {e}"]
    try:
        data = _read_regular(path / MANIFEST, MAX_MANIFEST)
    except FileNotFoundError:
        return [f"no {MANIFEST}"]
    except ValueError as e:
        return [f"unusable {MANIFEST}: {e}"]
    problems = []
    # hash the bytes we parse, so the marker vouches for exactly this manifest
    if marker.decode("utf-8", "replace").strip() != hashlib.sha256(data).hexdigest():
        problems.append(f"{MANIFEST} does not match the {MARKER} marker")
    manifest, bad = _parse_manifest(data)
    if manifest is None:
        return problems + bad
    if not _tag_matches(path, manifest.tag):
        problems.append(f"manifest tag {manifest.tag!r} does not match the directory name")
    if not manifest.files:
        problems.append(f"{MANIFEST} lists no files")
    members: dict[str, Path] = {}
    for rel in manifest.files:
        try:
            members[rel] = safe_member(path, rel)
        except UnsafePath as e:
            problems.append(f"unsafe file name in {MANIFEST}: {e}")
    problems += _unlisted(path, set(manifest.files))
    verified, skipped = [], set()
    for rel, f in members.items():
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            problems.append(f"missing file {rel}")
            continue
        want = manifest.files[rel]
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel} is not a regular file")
        elif only is not None and not only(rel):
            skipped.add(rel)
        elif st.st_size != want.size:
            problems.append(f"{rel} has {st.st_size} bytes, manifest says {want.size}")
        elif check_hashes and sha256_file(f) != want.sha256:
            problems.append(f"{rel} checksum mismatch (corrupt)")
        else:
            verified.append(rel)
    return problems + _check_contents(manifest, members, verified, skipped)


def _unlisted(path: Path, listed: set[str]) -> list[str]:
    """Entries of the directory tree the manifest does not account for."""
    problems: list[str] = []
    walk = os.walk(path, onerror=lambda e: problems.append(f"cannot read {e.filename}: {e.strerror}"))
    for dirpath, dirnames, filenames in walk:  # does not descend into symlinked directories
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(path).as_posix()
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel} is a symlink")
            elif stat.S_ISREG(mode):
                if rel not in listed and rel not in (MANIFEST, MARKER):
                    problems.append(f"{rel} is not listed in {MANIFEST}")
            elif not stat.S_ISDIR(mode):
                problems.append(f"{rel} is not a regular file or directory")
    return problems


def _check_contents(manifest: Manifest, members: dict[str, Path], verified: list[str], skipped: set[str]) -> list[str]:
    """safetensors headers and codec skeletons of files whose size (and hash) checked out."""
    from safetensors import safe_open

    from seqpar.checkpoint import codec

    problems, keys = [], {}
    for rel in verified:
        if rel.endswith(".safetensors"):
            try:
                with safe_open(str(members[rel]), framework="numpy") as h:
                    keys[rel] = set(h.keys())
            except Exception as e:
                problems.append(f"{rel}: unreadable safetensors header: {e}")
    check = getattr(codec, "check_skeleton", None)
    if check is None:
        return problems
    for rel in verified:
        sibling = rel.removesuffix(".json") + ".safetensors"
        if not rel.endswith(".json") or not (sibling in manifest.files or _RANK_DIR.match(rel)):
            continue
        if sibling in skipped:
            tensor_keys = None  # another rank's selection: its keys are not ours to read
        elif sibling in manifest.files:
            if sibling not in keys:
                continue  # the tensor file's own problem is reported already
            tensor_keys = keys[sibling]
        else:
            tensor_keys = set()  # no tensor file: the skeleton may refer to no tensor
        try:
            skeleton = json.loads(members[rel].read_bytes())
        except (ValueError, RecursionError) as e:
            problems.append(f"{rel}: unreadable JSON: {e}")
            continue
        problems += [f"{rel}: {p}" for p in check(skeleton, tensor_keys)]
    return problems


RUN_CHECKPOINTS = "checkpoints"  # <logging.run_dir>/checkpoints, the default checkpoint.dir
TRAINER_STATE_FILE = "trainer_state.json"


class NotACheckpoint(UserError, ValueError):
    """A path that names no checkpoint; ``code``: 2 for a path that is not there or not usable."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def is_checkpoint_dir(p: Path) -> bool:
    """One checkpoint (complete or not): its files, or a checkpoint's name without a root's ``latest``."""
    return p.is_dir() and (any(os.path.lexists(p / n) for n in (MANIFEST, MARKER, TRAINER_STATE_FILE))
                           or (parse_tag(p.name) is not None and not os.path.lexists(p / LATEST)))


def resolve_checkpoints(path: Path, newest: bool) -> list[Path]:
    """The checkpoint directories ``path`` means: itself, the one a ``latest`` file names, or a run
    directory's / checkpoints directory's ones (``newest``: the one ``latest`` names, else the
    newest). Raises ``NotACheckpoint`` saying what the path is instead."""
    path = Path(path)
    if not os.path.lexists(path):
        raise NotACheckpoint(f"{path} does not exist", 2)
    if path.name == LATEST and not path.is_dir():
        tag = read_latest(path.parent)
        if tag is None:
            raise NotACheckpoint(f"{path} does not name a checkpoint", 2)
        if (path.parent / tag).is_symlink():  # a checkpoint is a plain directory of its root
            raise NotACheckpoint(f"{path} names {tag}, a symbolic link (a checkpoint is a plain directory)", 2)
        if not (path.parent / tag).is_dir():
            raise NotACheckpoint(f"{path} names {tag}, which does not exist in {path.parent}", 2)
        return [path.parent / tag]
    if is_checkpoint_dir(path):
        return [path]
    root = path / RUN_CHECKPOINTS if (path / RUN_CHECKPOINTS).is_dir() else path
    if not root.is_dir():
        raise NotACheckpoint(f"{path} is not a directory", 2)
    found = [c.path for c in CheckpointStore(root).list()]
    if not found:
        raise NotACheckpoint(f"no checkpoints in {root} (a checkpoint directory holds {MARKER} and {MANIFEST}; "
                             f"a run directory holds {RUN_CHECKPOINTS}/)")
    if not newest:
        return found
    tag = read_latest(root)
    if tag is not None and root / tag in found:
        return [root / tag]
    return [found[-1]]
