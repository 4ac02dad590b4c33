"""Where a data set lives: a local folder or any fsspec URL (s3://, gs://, az://, file://, memory://).

Every file mifa writes or reads in an output goes through a `Location`, which offers the few operations the
pipeline needs and says what each guarantees on each kind of store:

- `commit(staged, rel)`: a file written to a local staging path appears whole at `rel`. Locally: fsync, then
  an atomic rename beside it. On an object store: one `put_file` (a single PUT, or a multipart upload that
  only becomes visible when completed), so a reader never sees half an object. A worker's view of the output
  (`for_tasks`) leaves out the fsync: a resume proves a task's files by their hashes anyway (a power cut that
  loses their bytes makes that task redone), and the run makes them durable as they come in (`flusher`),
  all of them before its run manifest publishes them.
- `create(rel, data)`: exclusive create, the commit point of a task (its done record) and of the output
  lock. Locally: link(2) of a finished temporary file, which fails if the name exists. On S3 (and stores
  that honour it): a PUT with `If-None-Match: *`, refused when the key exists. Elsewhere fsspec's generic
  check-then-write, which is not race-free (said in the README).
- reads, listings and deletes as fsspec does them.

pyarrow never opens a URL itself (its S3 client ignores `AWS_ENDPOINT_URL`): it is handed our fsspec
filesystem. Credentials come from the store's usual places (AWS_* variables, config files); the manifest's
`storage_options` may set endpoint and region but never a secret.
"""

from __future__ import annotations

import hashlib
import copy
import os
import re
import tempfile
import uuid
from contextlib import contextmanager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import blake3

TMP_MARK = ".tmp-"
PIECE = 1 << 20  # bytes per read when a file is hashed or copied

# scheme -> (module that implements it, the mifa extra that installs it)
DRIVERS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
}
BUILTIN = ("file", "local", "memory")
BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
SECRET_OPTIONS = re.compile(r"(key|secret|token|password|credential|sas|signature)", re.I)
SAFE_OPTIONS = {"endpoint_url", "region_name", "region", "client_kwargs", "config_kwargs", "anon", "use_ssl",
                "project", "account_name", "default_fill_cache", "requester_pays", "version_aware", "skip_instance_cache"}


class StorageError(ValueError):
    """A location mifa cannot use (bad URL, missing driver, a secret in the manifest): said before any work."""


def is_url(text: str | os.PathLike) -> bool:
    return "://" in str(text)


def check_storage_options(options: dict[str, Any]) -> None:
    """Endpoint and region may be written in a manifest; credentials never (they would land in the run manifest)."""
    for name, value in options.items():
        if SECRET_OPTIONS.search(name) and name not in SAFE_OPTIONS:
            raise StorageError(f"storage_options.{name}: credentials are never read from a manifest (they would be "
                               "written into the run manifest); set them in the environment (AWS_ACCESS_KEY_ID, "
                               "AWS_SECRET_ACCESS_KEY, ...) or the store's own config file")
        if isinstance(value, dict):
            check_storage_options(value)
        if isinstance(value, str) and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]+@", value, re.I):
            raise StorageError(f"storage_options.{name}: {value.split('@')[-1]!r} carries a user or password "
                               "before '@'; give credentials in the environment instead")


def _filesystem(protocol: str, options: dict[str, Any]):
    import fsspec

    module, extra = DRIVERS.get(protocol, (None, None))
    if protocol in BUCKETED:  # other processes write here too: never answer from a stale listing
        options = {"use_listings_cache": False, **options}
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError:
        what = f"pip install 'mifa[{extra}]'" if extra else "install the fsspec driver for it"
        raise StorageError(f"{protocol}:// needs the {module or protocol} package, which is not installed: {what}") from None
    except ValueError as exc:
        if "Protocol not known" in str(exc) or "not known" in str(exc):
            raise StorageError(f"{protocol}://: unknown storage scheme; expected a local path or one of s3://, gs://, "
                               "az://, file://, memory://") from None
        raise StorageError(f"{protocol}://: {exc}") from None
    except TypeError as exc:
        raise StorageError(f"storage_options for {protocol}://: {exc}") from None


def _url(protocol: str, root: str) -> str:
    """The URL of a store path (fsspec's memory paths keep their leading slash)."""
    return f"{protocol}://{root if protocol == 'memory' else root.lstrip('/')}"


class Location:
    """A data set's folder (local) or prefix (object store); files are named relative to it ('a/b.tar')."""

    durable = True  # local commits fsync before the rename (False in a worker's view: `for_tasks`)

    def __init__(self, where: str | os.PathLike, storage_options: dict[str, Any] | None = None):
        text = str(where).strip()
        self.storage_options = dict(storage_options or {})
        check_storage_options(self.storage_options)
        if not text:
            raise StorageError("location: empty; expected a folder or a URL such as s3://bucket/prefix")
        if is_url(text):
            protocol, _, rest = text.partition("://")
            protocol = protocol.lower()
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", protocol):
                raise StorageError(f"location {text!r}: malformed URL scheme {protocol!r}")
            if protocol in ("file", "local"):
                self._local(Path(rest or "/"))
                return
            if protocol in BUCKETED and (not rest or rest.startswith("/") or not rest.split("/")[0]):
                raise StorageError(f"location {text!r}: no bucket; expected {protocol}://BUCKET/PREFIX")
            if protocol not in DRIVERS and protocol not in BUILTIN:
                from fsspec.registry import known_implementations, registry

                if protocol not in known_implementations and protocol not in registry:
                    raise StorageError(f"location {text!r}: unknown storage scheme {protocol}://; expected a local "
                                       "path or one of s3://, gs://, az://, file://, memory://")
            self.fs = _filesystem(protocol, self.storage_options)
            self.protocol = protocol
            self.root = self.fs._strip_protocol(text).rstrip("/")
            if not self.root.strip("/"):
                raise StorageError(f"location {text!r}: names no folder or prefix")
            self.url = _url(protocol, self.root)
            self.is_local = False
        else:
            self._local(Path(text))

    def _local(self, path: Path) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.fs = LocalFileSystem()
        self.protocol = "file"
        self.root = str(path.expanduser().absolute())
        self.url = self.root
        self.is_local = True

    def __reduce__(self):  # workers rebuild the filesystem from (url, options); credentials come from their env
        return (Location, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.storage_options) == (other.url, other.storage_options)

    def __hash__(self) -> int:
        return hash(self.url)

    # ------------------------------------------------------------------ names
    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def path(self, rel: str = "") -> str:
        """The store's own path of `rel` (for fsspec calls)."""
        return f"{self.root}/{rel}" if rel else self.root

    def full_url(self, rel: str = "") -> str:
        """A URL any fsspec-aware reader (webdataset, wids, datasets) opens; a plain path when local."""
        return f"{self.url}/{rel}" if rel else self.url

    def local(self, rel: str = "") -> Path:
        """The local path of `rel` (local locations only)."""
        if not self.is_local:
            raise TypeError(f"{self.url} is not a local folder")
        return Path(self.path(rel))

    def _at(self, root: str) -> "Location":
        if self.is_local:
            return Location(root, self.storage_options)
        return Location(_url(self.protocol, root), self.storage_options)

    def child(self, name: str) -> "Location":
        return self._at(f"{self.root.rstrip('/')}/{name}")

    def parent(self) -> "Location":
        """The folder (or prefix) this one is in (a bucket's top level at most)."""
        up = self.root.rstrip("/").rsplit("/", 1)[0]
        return self._at(up or "/") if "/" in self.root.strip("/") or self.is_local else self

    def sibling(self, name: str) -> "Location":
        """Another location beside this one (a filter version next to its parent)."""
        return self.parent().child(name)

    # ------------------------------------------------------------------ reading (fsspec's, local or not)
    def exists(self, rel: str = "") -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def isfile(self, rel: str) -> bool:
        return bool(self.fs.isfile(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_parquet(self, rel: str, **kwargs: Any):
        """pyarrow reads through our filesystem (never its own S3 client)."""
        import pyarrow.parquet as pq

        if set(kwargs) <= {"columns"}:  # one file, whole columns: ParquetFile, without the dataset machinery
            with self.parquet_file(rel) as f:
                return f.read(**kwargs)
        return pq.read_table(self.path(rel), filesystem=None if self.is_local else self.fs, **kwargs)

    @contextmanager
    def parquet_file(self, rel: str) -> "Iterator[Any]":
        """A `pyarrow.parquet.ParquetFile` (its footer read; columns read on demand): a local file by Arrow's
        own reads (a Python file object costs it about a millisecond more per file), else through fsspec."""
        import pyarrow.parquet as pq

        with (nullcontext(self.path(rel)) if self.is_local else self.open(rel)) as source, pq.ParquetFile(source) as f:
            yield f

    def parquet_schema(self, rel: str):
        with self.parquet_file(rel) as f:
            return f.schema_arrow

    def _entries(self, rel: str, kind: str) -> list[str]:
        try:
            entries = self.fs.ls(self.path(rel), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == kind)

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the files directly under `rel` (sorted); [] when there is nothing there."""
        return self._entries(rel, "file")

    def subfolders(self) -> list["Location"]:
        """The folders (prefixes) directly in this one."""
        return [self.child(name) for name in self._entries("", "directory")]

    def find(self) -> list[str]:
        """Every file under the location, as relative names (sorted)."""
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix))

    def _pieces(self, rel: str) -> Iterator[memoryview]:
        """The file's bytes in pieces of one reused buffer (each valid until the next is asked for): no fresh
        memory per file, which for large files costs more than hashing them."""
        buffer = bytearray(PIECE)
        view = memoryview(buffer)
        with (open(self.path(rel), "rb", buffering=0) if self.is_local else self.open(rel)) as f:
            while n := f.readinto(buffer):
                yield view[:n]

    def digests(self, rel: str) -> dict[str, Any]:
        """A file's entry, read once: {"sha256", "md5", "bytes", "blake3"} (see `digest_pieces`)."""
        return digest_pieces(self._pieces(rel))

    def digest(self, rel: str, algorithm: str) -> tuple[str, int]:
        """(hex digest, size) of a file by one algorithm ('blake3' or a hashlib name), read once."""
        h, size = new_hash(algorithm), 0
        for piece in self._pieces(rel):
            h.update(piece)
            size += len(piece)
        return h.hexdigest(), size

    # ------------------------------------------------------------------ writing
    def stage(self, rel: str) -> Path:
        """A local path to write `rel` into before `commit`: beside it on a local disk (so the rename is
        atomic), in the system's temporary folder for an object store."""
        if self.is_local:
            final = Path(self.path(rel))
            final.parent.mkdir(parents=True, exist_ok=True)
            return final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
        fd, name = tempfile.mkstemp(prefix=f"mifa-{rel.replace('/', '-')}{TMP_MARK}")
        os.close(fd)
        return Path(name)

    def for_tasks(self) -> "Location":
        """This location as a worker writes its tasks' files (shards, identity blocks, done records): committed
        without an fsync each, made durable by the run's `flusher` (see the module docstring)."""
        view = copy.copy(self)
        view.durable = False
        return view

    def commit(self, staged: Path, rel: str) -> None:
        """Make the finished local file `staged` appear whole at `rel` (see the module docstring)."""
        try:
            if self.is_local:
                if self.durable:
                    _fsync(staged)
                os.replace(staged, self.path(rel))
            else:
                self.fs.put_file(str(staged), self.path(rel))
        finally:
            discard(staged)

    def write_bytes(self, rel: str, data: bytes) -> None:
        staged = self.stage(rel)
        try:
            staged.write_bytes(data)
            self.commit(staged, rel)
        finally:
            discard(staged)

    def copy_from(self, source: "Location", rel: str, algorithm: str, accept: Callable[[str, int], None]) -> None:
        """`source`'s file `rel` copied to the same name here, hashed on the way by `algorithm`: `accept(digest,
        size)` sees the digest of exactly the bytes written and refuses them by raising, before they are
        committed."""
        staged = self.stage(rel)
        try:
            h, size = new_hash(algorithm), 0
            with open(staged, "wb") as f:
                for piece in source._pieces(rel):
                    h.update(piece)
                    f.write(piece)
                    size += len(piece)
            accept(h.hexdigest(), size)
            self.commit(staged, rel)
        finally:
            discard(staged)

    def flusher(self) -> "Flush":
        """What makes files a worker's view committed (`for_tasks`) durable while the run goes on."""
        return Flush(self)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_parquet(self, rel: str, table, compression: str | dict[str, str] = "zstd",
                      **kwargs: Any) -> dict[str, Any]:
        """`table` as parquet at `rel`, whole or absent; returns the entry of the bytes written (`digest_pieces`),
        which a done record takes instead of reading the file back."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression=compression, **kwargs)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(rel, data)
        return digest_pieces([data])

    def create(self, rel: str, data: bytes) -> bool:
        """Exclusive create: True when `rel` was created with `data`, False when it already existed."""
        if self.is_local:
            staged = self.stage(rel)
            try:
                with open(staged, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                try:
                    os.link(staged, self.path(rel))
                except FileExistsError:
                    return False
                return True
            finally:
                discard(staged)
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
            return True
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or self.fs.exists(self.path(rel)):
                return False
            raise

    def remove(self, rel: str) -> None:
        """Delete a file; nothing when it is not there."""
        try:
            self.fs.rm_file(self.path(rel))
        except FileNotFoundError:
            pass

    def remove_tree(self, rel: str) -> None:
        """Delete a folder (prefix) and all it holds; nothing when it is not there."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def prune(self, rel: str = "") -> None:
        """Remove empty local folders (object stores have none)."""
        if self.is_local:
            try:
                os.rmdir(self.path(rel))
            except OSError:
                pass


class Flush:
    """Files of a worker's view (`Location.for_tasks`) made durable as a run hands them in, while it goes on:
    an fsync each on a pool of threads (several writes in flight: the device orders them, as sync(1) does;
    cheap once the kernel has written a file back), then their folders (the renames) when it closes. Closed
    without an error it has made every file durable, or raises; after an error it only stops. Nothing on an
    object store (a stored object is)."""

    def __init__(self, location: Location):
        self.location = location
        self.threads = ThreadPoolExecutor(8) if location.is_local else None
        self.pending: list = []
        self.folders: set[str] = set()

    def add(self, rels: "Iterable[str]") -> None:
        if self.threads is None:
            return
        for rel in rels:
            path = self.location.path(rel)
            self.folders.add(os.path.dirname(path))
            self.pending.append(self.threads.submit(_fsync, path))

    def __enter__(self) -> "Flush":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.threads is None:
            return
        try:
            if kind is None:
                for done in self.pending:
                    done.result()
                for folder in sorted(self.folders):
                    _fsync(folder)
        finally:  # after an error nothing more starts and nothing waits (the fsyncs under way end by themselves)
            self.threads.shutdown(wait=kind is None, cancel_futures=True)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parquet_from_bytes(data: bytes, columns: list[str] | None = None):
    """A parquet file already in memory as a table (ParquetFile: pq.read_table would import pyarrow.dataset,
    about 0.3 s the first time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(pa.BufferReader(data)) as f:
        return f.read(columns=columns)


def digest_pieces(pieces: Iterable[bytes | memoryview]) -> dict[str, Any]:
    """The entry a done record and a run manifest keep for the bytes of `pieces` (a file, or bytes in memory:
    `[data]`): {"sha256", "md5", "bytes", "blake3"}. sha256 and md5 are what readers check (Croissant, wids);
    BLAKE3 is what mifa proves files by (`done.proof_of`)."""
    sha, md5, b3, size = hashlib.sha256(), hashlib.md5(), blake3.blake3(), 0
    for piece in pieces:
        sha.update(piece)
        md5.update(piece)
        b3.update(piece)
        size += len(piece)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest(), "bytes": size, "blake3": b3.hexdigest()}


def new_hash(algorithm: str):
    """A hash object: BLAKE3 (about 2.6x sha256's speed here, 6x md5's), or any hashlib algorithm."""
    return blake3.blake3() if algorithm == "blake3" else hashlib.new(algorithm)


def discard(staged: Path) -> None:
    try:
        staged.unlink(missing_ok=True)
    except OSError:
        pass


def location(where: "str | os.PathLike | Location", storage_options: dict[str, Any] | None = None) -> Location:
    return where if isinstance(where, Location) else Location(where, storage_options)
