"""Content-addressed stage outputs on an fsspec object store (``file://`` or ``s3://``).

Layout under the root URL::

    <stage>/<key>/...                         one stage output
    <stage>/<key>/manifest.json               written LAST: its presence means the output is complete
    <stage>/<key>/checkpoints/step-000120/    mid-stage checkpoint, complete once it holds COMPLETE

Readers trust only outputs with a manifest, and only checkpoints with a COMPLETE marker, so a crash at any
point leaves nothing that can be mistaken for a finished result.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"step-(\d+)$")
_HASH_CHUNK = 8 << 20


class FileEntry(BaseModel):
    path: str  # relative to the output folder
    size: int
    sha256: str


class Manifest(BaseModel):
    """What a stage produced and from what. ``content_id`` depends only on the files' contents."""

    stage: str
    key: str
    stage_version: int
    content_id: str
    config: dict[str, Any]
    upstream: dict[str, str] = Field(default_factory=dict, description="stage -> key of the inputs")
    upstream_content: dict[str, str] = Field(default_factory=dict, description="stage -> content_id")
    files: list[FileEntry]
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    producer: dict[str, Any] = Field(default_factory=dict, description="flow run, host, user (lineage)")
    created_at: str

    def file(self, rel: str) -> FileEntry:
        for f in self.files:
            if f.path == rel:
                return f
        raise KeyError(f"{self.stage}/{self.key} has no file {rel!r}")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def content_id(files: list[FileEntry]) -> str:
    items = sorted((f.path, f.sha256) for f in files)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def hash_key(payload: Any) -> str:
    """Stable short hash of a JSON-able payload (cache keys)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("rlhf-flow", "torch", "deepspeed", "transformers", "peft", "datasets", "pyarrow", "fsspec"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """One root URL opened through fsspec."""

    def __init__(self, root: str, endpoint_url: str | None = None):
        if "://" not in root:
            root = "file://" + root
        scheme, rest = root.split("://", 1)
        options: dict[str, Any] = {}
        if scheme == "file":
            rest = os.path.abspath(os.path.expanduser(rest))
            root = f"file://{rest}"
        elif scheme == "s3":
            endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
            if endpoint:
                options["client_kwargs"] = {"endpoint_url": endpoint}
            # Several processes write the same store: never answer from a stale listing.
            options["use_listings_cache"] = False
            options["skip_instance_cache"] = True
        self.url = root.rstrip("/")
        self.scheme = scheme
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        self.root = self.root.rstrip("/")
        self.storage_options = options

    @classmethod
    def from_config(cls, storage) -> "Store":
        return cls(storage.root, storage.endpoint_url)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return f"{self.scheme}://{self.path(*parts)}"

    def local_path(self, *parts: str) -> str | None:
        """The local filesystem path of a store path, or None when the store is remote."""
        return self.path(*parts) if self.scheme == "file" else None

    def output_path(self, stage: str, key: str, *rel: str) -> str:
        return self.path(stage, key, *rel)

    # -------------------------------------------------------------- manifests
    def read_manifest(self, stage: str, key: str) -> Manifest | None:
        path = self.output_path(stage, key, MANIFEST)
        try:
            with self.fs.open(path, "rb") as f:
                return Manifest.model_validate_json(f.read())
        except FileNotFoundError:
            return None

    def has_output(self, stage: str, key: str) -> bool:
        return self.fs.exists(self.output_path(stage, key, MANIFEST))

    def manifest_id(self, stage: str, key: str) -> str | None:
        """content_id of a complete output, or None if it is missing (for Prefect's cache key)."""
        m = self.read_manifest(stage, key)
        return m.content_id if m else None

    def list_outputs(self, stage: str | None = None) -> list[Manifest]:
        stages = [stage] if stage else self.list_stages()
        out: list[Manifest] = []
        for s in stages:
            for key in self._children(self.path(s)):
                m = self.read_manifest(s, key)
                if m is not None:
                    out.append(m)
        return out

    def list_stages(self) -> list[str]:
        return sorted(c for c in self._children(self.root) if not c.startswith("_"))

    def _children(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")

    @contextmanager
    def open_output(self, stage: str, key: str) -> Iterator["OutputWriter"]:
        """Write one stage output; the manifest is written by ``commit`` and only then is it visible.

        Leftovers of an earlier attempt that never committed are removed first, except its checkpoints
        (the new attempt resumes from them).
        """
        if self.has_output(stage, key):
            raise FileExistsError(f"{self.url_of(stage, key)} is complete already; refusing to overwrite it")
        base = self.output_path(stage, key)
        for child in self._ls_names(base):
            if child != CHECKPOINTS:
                self.fs.rm(self.path(stage, key, child), recursive=True)
        writer = OutputWriter(self, stage, key)
        yield writer
        if not writer.committed:
            raise RuntimeError(f"output {stage}/{key} was written but not committed")

    def _ls_names(self, path: str) -> list[str]:
        try:
            return [posixpath.basename(e.rstrip("/")) for e in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def delete_output(self, stage: str, key: str) -> None:
        """Remove an output, manifest first so that no reader sees it half-deleted."""
        manifest = self.output_path(stage, key, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm(manifest)
        base = self.output_path(stage, key)
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)

    # ------------------------------------------------------------------ files
    def read_bytes(self, stage: str, key: str, rel: str) -> bytes:
        return self.fs.cat_file(self.output_path(stage, key, rel))

    def read_json(self, stage: str, key: str, rel: str) -> Any:
        return json.loads(self.read_bytes(stage, key, rel))

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Object stores replace whole objects; on a local disk write a temp file and rename it."""
        if self.scheme == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def fetch(self, stage: str, key: str, rel: str, cache_dir: str | None = None) -> str:
        """A local path holding ``<stage>/<key>/<rel>`` (a file or a folder): the path itself on a local
        store, else a download cached under the output's content id (or the checkpoint's step)."""
        local = self.local_path(stage, key, rel)
        if local is not None:
            return local
        m = self.read_manifest(stage, key)
        tag = m.content_id[:16] if m else "partial"
        target = _cache_root(cache_dir) / stage / key / tag / rel
        return _download_once(self.fs, self.output_path(stage, key, rel), target)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, stage: str, key: str, step: int) -> str:
        return self.output_path(stage, key, CHECKPOINTS, f"step-{step:06d}")

    def list_checkpoints(self, stage: str, key: str) -> list[int]:
        """Steps of complete checkpoints, ascending."""
        steps = []
        for name in self._ls_names(self.output_path(stage, key, CHECKPOINTS)):
            m = _STEP_RE.match(name)
            if m and self.fs.exists(self.output_path(stage, key, CHECKPOINTS, name, COMPLETE)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_checkpoint(self, stage: str, key: str) -> int | None:
        steps = self.list_checkpoints(stage, key)
        return steps[-1] if steps else None

    @contextmanager
    def write_checkpoint(self, stage: str, key: str, step: int, keep: int, rank: int = 0,
                         barrier: Callable[[], None] | None = None) -> Iterator[str]:
        """Yield a local folder to save a checkpoint into; on exit upload it (remote stores), mark it
        COMPLETE and prune older checkpoints down to ``keep``.

        With several processes every rank enters (each writes its own files), ``barrier`` synchronises
        them, and rank 0 alone clears a stale attempt, writes the marker and prunes.
        """
        sync = barrier or (lambda: None)
        dest = self.checkpoint_path(stage, key, step)
        if rank == 0 and self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)  # an incomplete earlier attempt at this step
        sync()
        local = self.local_path(stage, key, CHECKPOINTS, f"step-{step:06d}")
        if local is not None:
            os.makedirs(local, exist_ok=True)
            yield local
        else:
            with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as tmp:
                yield tmp
                self.fs.put(tmp.rstrip("/") + "/", dest, recursive=True)
        sync()
        if rank == 0:
            marker = posixpath.join(dest, COMPLETE)
            self.write_bytes_atomic(marker, json.dumps({"step": step, "at": _utcnow()}).encode())
            for old in self.list_checkpoints(stage, key)[:-keep]:
                self.fs.rm(self.checkpoint_path(stage, key, old), recursive=True)
        sync()

    def fetch_checkpoint(self, stage: str, key: str, step: int, rank: int = 0) -> str:
        """A local folder with the checkpoint's files (the folder itself on a local store; a per-rank
        download otherwise, so that ranks sharing a node never write the same cache folder)."""
        rel = f"{CHECKPOINTS}/step-{step:06d}"
        local = self.local_path(stage, key, rel)
        if local is not None:
            return local
        cache = Path(os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf")) / f"rank{rank}"
        return self.fetch(stage, key, rel, cache_dir=str(cache))

    def drop_checkpoints_after(self, stage: str, key: str, step: int) -> list[int]:
        """Remove the checkpoints (complete or not) after ``step``, latest first and each marker before its
        files, so that ``step`` is the latest complete one whatever moment this is stopped at. Returns the
        steps removed."""
        steps = sorted((int(m.group(1)) for name in self._ls_names(self.output_path(stage, key, CHECKPOINTS))
                        if (m := _STEP_RE.match(name)) and int(m.group(1)) > step), reverse=True)
        for later in steps:
            marker = posixpath.join(self.checkpoint_path(stage, key, later), COMPLETE)
            if self.fs.exists(marker):
                self.fs.rm(marker)
            self.fs.rm(self.checkpoint_path(stage, key, later), recursive=True)
        return steps

    def delete_checkpoints(self, stage: str, key: str) -> None:
        path = self.output_path(stage, key, CHECKPOINTS)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


class OutputWriter:
    """Collects the files of one stage output, then writes the manifest last."""

    def __init__(self, store: Store, stage: str, key: str):
        self.store, self.stage, self.key = store, stage, key
        self.files: dict[str, FileEntry] = {}
        self.committed = False

    @property
    def url(self) -> str:
        return self.store.url_of(self.stage, self.key)

    def local_dir(self, rel: str = "") -> str | None:
        """Local folder of the output (local stores only) so that writers can save in place."""
        return self.store.local_path(self.stage, self.key, rel) if rel else self.store.local_path(self.stage, self.key)

    def write_bytes(self, rel: str, data: bytes) -> FileEntry:
        path = self.store.output_path(self.stage, self.key, rel)
        self.store.write_bytes_atomic(path, data)
        entry = FileEntry(path=rel, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        self.files[rel] = entry
        return entry

    def write_json(self, rel: str, obj: Any) -> FileEntry:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def put_file(self, local: str | os.PathLike, rel: str) -> FileEntry:
        local = str(local)
        dest = self.store.output_path(self.stage, self.key, rel)
        if self.store.scheme == "file":
            if os.path.abspath(local) != os.path.abspath(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(local, dest)
        else:
            self.store.fs.put_file(local, dest)
        entry = FileEntry(path=rel, size=os.path.getsize(local), sha256=_sha256_file(local))
        self.files[rel] = entry
        return entry

    def put_dir(self, local_dir: str | os.PathLike, rel: str) -> list[FileEntry]:
        """Add every file under ``local_dir`` (which may already be inside a local store output)."""
        out = []
        for root, _dirs, names in os.walk(local_dir):
            for name in sorted(names):
                full = os.path.join(root, name)
                sub = os.path.relpath(full, local_dir).replace(os.sep, "/")
                out.append(self.put_file(full, posixpath.join(rel, sub) if rel else sub))
        return out

    def copy_in(self, source: "Store", rel: str, expect: FileEntry) -> FileEntry:
        """Copy ``rel`` from another store's folder (any fsspec URL), streaming, and check it against
        ``expect`` (size and SHA-256) so that a copy is never taken for the original unless it is one."""
        h, size = hashlib.sha256(), 0
        dest = self.store.output_path(self.stage, self.key, rel)
        if self.store.scheme == "file":
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        with source.fs.open(source.path(rel), "rb") as fin, self.store.fs.open(dest, "wb") as fout:
            while chunk := fin.read(_HASH_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
        if size != expect.size or h.hexdigest() != expect.sha256:
            raise ValueError(
                f"{source.url}/{rel} does not match its manifest (size {size} vs {expect.size}, sha256 "
                f"{h.hexdigest()[:12]} vs {expect.sha256[:12]}): the source output was changed after it was written"
            )
        self.files[rel] = expect
        return expect

    def commit_copy(self, manifest: Manifest, producer: dict[str, Any]) -> Manifest:
        """Write the manifest of an output copied from elsewhere: the original's, with ``producer``
        merged in; its files must be exactly the ones copied."""
        if manifest.stage != self.stage or manifest.key != self.key or content_id(list(self.files.values())) != manifest.content_id:
            raise ValueError(f"the files copied into {self.url} are not those of {manifest.stage}/{manifest.key}")
        copy = manifest.model_copy(update={"producer": {**manifest.producer, **producer}})
        path = self.store.output_path(self.stage, self.key, MANIFEST)
        self.store.write_bytes_atomic(path, copy.model_dump_json(indent=2).encode())
        self.committed = True
        return copy

    def commit(
        self,
        *,
        stage_version: int,
        config: dict[str, Any],
        upstream: dict[str, Manifest] | None = None,
        metrics: dict[str, Any] | None = None,
        producer: dict[str, Any] | None = None,
    ) -> Manifest:
        files = sorted(self.files.values(), key=lambda f: f.path)
        upstream = upstream or {}
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            stage_version=stage_version,
            content_id=content_id(files),
            config=config,
            upstream={s: m.key for s, m in upstream.items()},
            upstream_content={s: m.content_id for s, m in upstream.items()},
            files=files,
            metrics=metrics or {},
            versions=package_versions(),
            producer=producer or {},
            created_at=_utcnow(),
        )
        path = self.store.output_path(self.stage, self.key, MANIFEST)
        self.store.write_bytes_atomic(path, manifest.model_dump_json(indent=2).encode())
        self.committed = True
        return manifest


# The S3 client's exceptions (botocore's and aiohttp's, by class name: neither need be imported) that say the
# store could not be reached, as opposed to a missing object or a refused request. Only these: a connection
# refused by something else (Prefect's API, through httpx) is not the store's.
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ServerTimeoutError"}
STORE_UNAVAILABLE_EXIT = 75  # a worker's exit code when its store could not be reached (EX_TEMPFAIL)


class StoreUnavailable(RuntimeError):
    """The store could not be reached (its endpoint is down, or the network to it). Nothing partial is visible:
    outputs without a manifest do not count, and the next run resumes from the last complete checkpoint."""


def unreachable(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is the S3 client saying that the store could not
    be reached. (A local store has no connection to lose; its errors are errors.)"""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _UNREACHABLE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unavailable(url: str, exc: BaseException) -> StoreUnavailable:
    """The error to raise for ``exc`` when ``unreachable(exc)``: what failed and what to do, in one line."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StoreUnavailable(
        f"the store {url} cannot be reached ({type(exc).__name__}: {reason}). Check that it is up and that "
        "storage.endpoint_url / AWS_ENDPOINT_URL point at it, then run the same command again: finished stages "
        "are kept, an unfinished one resumes from its latest complete checkpoint, and nothing partial is visible")


def check_root(root: str, endpoint_url: str | None = None) -> None:
    """Refuse a store root that cannot be used, before any work: a file where a folder belongs, a folder that
    cannot be created or written, S3 without credentials, a bucket that cannot be written. Leaves nothing
    behind (a probe file is removed, folders made for the probe are removed again).

    Raises:
        ConfigError: naming storage.root, what was wrong and the fix.
    """
    from rlhf_core.config import ConfigError

    store = Store(root, endpoint_url)
    if store.scheme == "file":
        path = store.root
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"storage.root {store.url} is a file, not a folder; point storage.root at a folder "
                              "(it is created if it does not exist)")
        made, p = [], path
        while not os.path.exists(p):
            made.append(p)
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise ConfigError(f"storage.root {store.url} cannot be created: {p} is a file; point storage.root at a "
                              "folder")
        try:
            os.makedirs(path, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=".rlhf-probe-")
            os.close(fd)
            os.remove(probe)
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(13, "not readable and writable by this user")
        except OSError as e:
            raise ConfigError(f"storage.root {store.url} cannot be used: {e.strerror or e} ({p if made else path}); "
                              "point storage.root at a folder this user can write") from None
        finally:
            for d in made:
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        return
    if store.scheme == "s3":
        import botocore.session

        if botocore.session.Session().get_credentials() is None:
            raise ConfigError(f"storage.root {store.url} needs AWS credentials and none were found: set "
                              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials, an "
                              "instance role) in the environment of every process that runs rlhf; they are never "
                              "read from the config")
        probe = store.path(f".rlhf-probe-{os.getpid()}-{platform.node()}")
        try:
            store.fs.pipe_file(probe, b"")
            store.fs.rm(probe)
        except Exception as e:  # botocore and s3fs raise many types (no bucket, denied, no endpoint)
            raise ConfigError(f"storage.root {store.url} cannot be written ({type(e).__name__}: {e}); check the "
                              "bucket name, the credentials' permissions and storage.endpoint_url / "
                              "AWS_ENDPOINT_URL") from None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local path for a model/tokenizer reference: plain paths and hub names pass through, ``file://``
    loses its scheme, any other fsspec URL (s3://...) is downloaded once into the cache."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if scheme == "file":
        return rest
    store = Store(url)
    target = _cache_root(cache_dir) / "urls" / hashlib.sha256(url.encode()).hexdigest()[:24]
    return _download_once(store.fs, store.root, target)


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("RLHF_CACHE_DIR", Path.home() / ".cache" / "rlhf"))


def _download_once(fs, remote: str, target: Path) -> str:
    """Copy a remote file or folder to ``target`` unless an earlier copy finished (its ``.done`` marker);
    a copy that was interrupted is removed and made again."""
    done = target.with_name(target.name + ".done")
    if not done.exists():
        if target.is_dir():
            shutil.rmtree(target)
        if not fs.exists(remote):
            raise FileNotFoundError(f"{fs.unstrip_protocol(remote)} does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", str(target), recursive=True)
        else:
            fs.get_file(remote, str(target))
        done.touch()
    return str(target)
