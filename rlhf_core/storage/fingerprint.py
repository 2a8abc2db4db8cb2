"""Content fingerprints for cache keys: what a named file, folder or hub reference holds.

A key must change when the bytes a stage reads change, and only then: a file counts by its SHA-256, a
folder by its files' relative paths and hashes, a hub model or dataset by its name and the hub's commit.
Hashing is memoised on fsspec's ``ukey`` (size and modification time on a local disk, the ETag on S3), in
this process and on disk under ``$RLHF_CACHE_DIR/fingerprints``, so a 26 GB model folder is read once per
change, not once per key computed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import fsspec

_CHUNK = 8 << 20


class MissingReference(FileNotFoundError):
    """A path or URL that a config names does not exist."""


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf"))


def file_fingerprint(url: str) -> str:
    """SHA-256 of a file's bytes (hex)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        ukey = fs.ukey(path)
    except FileNotFoundError:
        raise MissingReference(f"{url}: file not found") from None
    return _content_hash(url, str(ukey))


@functools.lru_cache(maxsize=4096)
def _content_hash(url: str, ukey: str) -> str:
    memo = cache_root() / "fingerprints" / hashlib.sha256(f"{url}\0{ukey}".encode()).hexdigest()
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(memo.name + f".{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs the next run a re-read
        pass
    return digest


def folder_fingerprint(url: str) -> str:
    """Hash of every file under a folder: relative paths and contents (hex)."""
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    items = [(p[len(root):], file_fingerprint(fs.unstrip_protocol(p))) for p in sorted(fs.find(root))]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def reference_fingerprint(ref: str, revision: str | None = None, kind: str = "model") -> str:
    """A model, tokenizer or dataset reference: a local path or fsspec URL counts by content (file or
    folder); anything else is a hub name, counted as ``name@commit`` (``revision``, or the hub's current
    commit; ``unresolved`` when the hub cannot be reached)."""
    fs, path = fsspec.core.url_to_fs(ref)
    if "://" in ref or os.path.isabs(ref) or ref.startswith((".", "~")) or fs.exists(path):
        if not fs.exists(path):
            raise MissingReference(f"{ref} does not exist")
        return folder_fingerprint(ref) if fs.isdir(path) else file_fingerprint(ref)
    return f"{ref}@{revision or hub_revision(ref, kind)}"


@functools.lru_cache(maxsize=256)
def hub_revision(name: str, kind: str = "model") -> str:
    """The hub's current commit of a model or dataset (one request per name and process)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "unresolved"
    try:
        import huggingface_hub

        info = (huggingface_hub.dataset_info if kind == "dataset" else huggingface_hub.model_info)(name)
        return info.sha or "unknown"
    except Exception:  # offline or not found: the name alone; loading it fails with a clear error anyway
        return "unresolved"


def function_fingerprint(spec: str) -> str:
    """A "package.module:function" reference: its name and the SHA-256 of the module's source file, found
    without running the module (its parent packages are imported, as any import does). Only that file counts,
    not the modules it imports.

    Raises:
        MissingReference: the module cannot be found, or has no source file.
    """
    import importlib.util

    module, _, function = spec.partition(":")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        found, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "no such module"
    if found is None or not found.origin or not os.path.isfile(found.origin):
        raise MissingReference(f"{spec}: cannot find module {module!r} ({why if found is None else 'no source file'}); "
                               "the workers import it, so it must be importable (on PYTHONPATH or installed)")
    return f"{spec}@{file_fingerprint(found.origin)}"
