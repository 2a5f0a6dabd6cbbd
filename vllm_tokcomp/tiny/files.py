"""What every tiny-model builder shares: where models live, file digests, the manifest that marks a
finished build, and building into place atomically so that concurrent processes never see half a model."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

MANIFEST_NAME = "tokcomp_tiny.json"
MODELS_DIR_ENV = "TOKCOMP_MODELS_DIR"


def models_root() -> Path:
    """``$TOKCOMP_MODELS_DIR``, default ``~/.cache/vllm-tokcomp/models``."""
    root = os.environ.get(MODELS_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "vllm-tokcomp" / "models"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start_build(out: Path) -> None:
    """Create ``out``; drop an old manifest first, since the manifest marks a complete build and is written last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)


def write_manifest(out: Path, fields: dict) -> dict:
    """Finish a build: ``fields`` plus every file's size and digest, written atomically as the manifest."""
    os.chmod(out / "model.safetensors", 0o644)  # safetensors creates the file 0600
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {**fields, "files": {name: {"size": (out / name).stat().st_size, "sha256": sha256(out / name)}
                                    for name in files}}
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return manifest


def read_manifest(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_in_place(target: Path, ready: Callable[[], bool], build: Callable[[Path], object]) -> Path:
    """Return ``target``, first running ``build(tmp)`` into a temporary sibling renamed into place when
    ``ready()`` is false, under an exclusive file lock (a stale or incomplete ``target`` is replaced)."""
    if ready():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(parent / f".{target.name}.lock"):
        if ready():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)
            if target.exists() or target.is_symlink():
                stale = parent / f".{target.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not ready():  # lost a race without the lock
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
