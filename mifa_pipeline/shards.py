"""The shard format: byte-reproducible WebDataset tars, a parquet sidecar per shard, the wids index.

This module knows samples only as (key, encoded image, metadata dict, class index); it knows no model.
Tars are the bytes webdataset's TarWriter writes with a fixed mtime, owner and mode and members in sorted
order (headers filled into one that tarfile made, `_MemberHeaders`), to a local staging file that is then
committed whole (`storage.Location.commit`: an atomic rename on a disk, one PUT or completed multipart
upload on an object store): a shard name holds a whole shard or nothing. Local staging names are hidden and unique (`.NAME.tmp-<random>`), so two writers never share one
and a reader globbing `*.tar` never meets one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic_core
from PIL import Image

from mifa_pipeline.storage import TMP_MARK, Location, discard, location  # noqa: F401 (TMP_MARK: re-exported)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: no build time leaks into the bytes
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_INDEX = "shardindex.json"
IMAGE_EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}


@dataclass
class ShardSample:
    key: str
    image: bytes
    image_ext: str  # "png", "jpg" or "webp"
    metadata: dict[str, Any]  # becomes KEY.json and a sidecar row
    label: int  # becomes KEY.cls (ASCII digits)


@dataclass
class ShardInfo:
    path: str  # relative to the data set folder
    nsamples: int
    bytes: int
    sha256: str
    md5: str
    first_key: str | None  # None for a shard all of whose samples were dropped
    last_key: str | None
    blake3: str | None = None  # (None: copied from a data set made before mifa recorded BLAKE3)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not (k == "blake3" and v is None)}


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_image(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "png":
        pil.save(buf, format="PNG", optimize=False, compress_level=6)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image format {fmt!r}: expected one of {sorted(IMAGE_EXTENSIONS)}")
    return buf.getvalue()


def decode_image(data: bytes, mode: str = "RGB") -> np.ndarray:
    """The inverse of `encode_image` (an RGB array, or "L" for a mask)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode), dtype=np.uint8).copy()


def metadata_json(metadata: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, by pydantic-core's encoder (a third of `json.dumps`'s time per sample; the same
    text but for floats below 1e-4, which it writes as 0.00001 where Python writes 1e-05). No NaN or infinity:
    JSON has none, so such a value is refused (by `json.dumps`, which names it) rather than written."""
    data = pydantic_core.to_json(metadata, inf_nan_mode="constants")
    if b"NaN" in data or b"Infinity" in data:  # (or in a string: then json.dumps finds nothing to refuse)
        json.dumps(metadata, allow_nan=False)
    return data


def to_wds(sample: ShardSample) -> dict[str, Any]:
    if not KEY_PATTERN.match(sample.key):
        raise ValueError(f"sample key {sample.key!r} must match {KEY_PATTERN.pattern} (no dots)")
    return {
        "__key__": sample.key,
        sample.image_ext: sample.image,
        "json": metadata_json(sample.metadata),
        "cls": str(int(sample.label)).encode("ascii"),
    }


def _flatten(prefix: str, value: Any, row: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            name = f"{prefix}_{k}" if prefix else str(k)
            if isinstance(v, (dict, list, tuple)):
                _flatten(name, v, row)
            else:  # (most values: a scalar, set here without another call)
                row[name] = v
    elif isinstance(value, (list, tuple)):
        row[prefix] = json.dumps(value)
    else:
        row[prefix] = value


def sidecar_row(sample: ShardSample, shard: str) -> dict[str, Any]:
    return _Written.of(sample).row(shard)


def _column_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if not present:
        return pa.float64()  # an all-null score column stays numeric, so every shard has one schema
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _column(values: list[Any]) -> pa.Array:
    """Arrow's own inference where it agrees with `_column_type` (fast), that rule otherwise."""
    try:
        array = pa.array(values)
        if array.type in (pa.int64(), pa.float64(), pa.bool_(), pa.string()):
            return array
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    kind = _column_type(values)
    if kind == pa.string():
        values = [None if v is None else str(v) for v in values]
    return pa.array(values, type=kind)


def sidecar_table(rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """The sidecar of a shard's rows: with `schema` (the published one), exactly its columns and types, no null."""
    if schema is not None:
        for row in rows:
            if list(row) != schema.names:
                differ = sorted(set(row) ^ set(schema.names)) or "order"
                raise ValueError(f"sidecar row {row.get('key')}: columns differ from the sidecar schema ({differ})")
        table = pa.Table.from_pylist(rows, schema=schema)
        nulls = [name for name, col in zip(table.column_names, table.columns) if col.null_count]
        if nulls:
            raise ValueError(f"sidecar: null in {nulls[:5]}; the sample schema allows none")
        return table
    if not rows:  # a shard whose samples were all dropped: the columns every sidecar has
        return pa.table({"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                         "label": pa.array([], pa.int64()), "image_ext": pa.array([], pa.string()),
                         "image_sha256": pa.array([], pa.string())})
    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


def _member_spans(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, start, end) of each member of a plain ustar archive (what TarWriter writes for short names),
    read from the name and size fields alone; None when any header needs tarfile's full parser (PAX, GNU)."""
    spans, at = [], 0
    while at + tarfile.BLOCKSIZE <= len(data):
        header = data[at:at + tarfile.BLOCKSIZE]
        if not header.strip(b"\0"):
            return spans  # the end-of-archive blocks
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or header[345:346] != b"\0":
            return None  # another member type, or a name prefix: let tarfile read it
        size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        end = at + tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        spans.append((header[:100].split(b"\0")[0].decode("utf-8"), at, end))
        at = end
    return spans


def tar_members(data: bytes, keys: set[str] | None = None) -> dict[str, dict[str, bytes]]:
    """key -> {extension: member bytes} of a tar's bytes, in tar order, nothing decoded (webdataset's rule:
    the key ends at the first dot). With `keys`, only those samples' members are extracted."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                key, _, ext = info.name.partition(".")
                if keys is None or key in keys:
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return members


def tar_segments(data: bytes, label: str = "tar") -> dict[str, bytes]:
    """key -> the raw bytes of its members (headers, data, padding) in a tar mifa wrote: copyable as they are."""
    spans = _member_spans(data)
    if spans is None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            spans = [(info.name, info.offset, info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                     for info in tar]
    keys: dict[str, list[int]] = {}
    for name, start, end in spans:
        span = keys.setdefault(name.partition(".")[0], [start, start])
        if start != span[1]:
            raise ValueError(f"{label}: the members of {name.partition('.')[0]} are not contiguous")
        span[1] = end
    return {key: data[a:b] for key, (a, b) in keys.items()}


class _MemberHeaders:
    """The ustar header tarfile writes for a member, from a template tarfile made, with the name, size and
    checksum filled in: byte for byte what `TarWriter` writes (a test compares them), at a sixth of the cost of
    a `TarInfo` and `addfile` per member (13 against 83-86 us for a sample of three members, which were most of
    a shard's writing time). A member
    tarfile gives more than one header (a long or non-ASCII name, a size past ustar's 11 octal digits) gets
    tarfile's own `tobuf`, with the format, encoding and errors `TarWriter`'s stream uses."""

    NAME, SIZE, CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
    FORMAT, ENCODING, ERRORS = tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"

    def __init__(self, mtime: int, mode: int, user: str, group: str):
        self.mtime, self.mode, self.user, self.group = mtime, mode, user, group
        template = bytearray(self._tobuf("-", 0))
        if len(template) != tarfile.BLOCKSIZE:
            raise AssertionError("tarfile wrote more than one header block for the template member")
        template[self.NAME] = bytes(100)
        template[self.CHECKSUM] = b" " * 8  # how tarfile sums a header: its checksum field as spaces
        self.template = bytes(template)
        self.base_sum = sum(template) - sum(template[self.SIZE])  # the checksum less the name's and size's bytes

    def _tobuf(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, self.mtime, self.mode, self.user, self.group
        return info.tobuf(self.FORMAT, self.ENCODING, self.ERRORS)

    def member(self, name: str, data: bytes) -> list[bytes]:
        """Header, data and padding of one member, as tarfile's `addfile` writes them."""
        size = len(data)
        if not name.isascii() or len(name) > 100 or size >= 8 ** 11:
            header = self._tobuf(name, size)
        else:
            raw, octal = name.encode("ascii"), b"%011o\0" % size
            block = bytearray(self.template)
            block[:len(raw)] = raw
            block[self.SIZE] = octal
            block[self.CHECKSUM] = b"%06o\0 " % (self.base_sum + sum(raw) + sum(octal))
            header = bytes(block)
        return [header, data, bytes(-size % tarfile.BLOCKSIZE)]


def archive_end(offset: int) -> bytes:
    """What tarfile writes on closing an archive of `offset` bytes: two zero blocks, then zeros to a record."""
    offset += 2 * tarfile.BLOCKSIZE
    return bytes(2 * tarfile.BLOCKSIZE + -offset % tarfile.RECORDSIZE)


@functools.cache
def _hashing() -> ThreadPoolExecutor:
    """Threads that hash finished tars while their shard's sidecar is built (sha256, md5 and BLAKE3 release the
    GIL)."""
    return ThreadPoolExecutor(2, thread_name_prefix="mifa-hash")


def file_digests(path: Path) -> dict[str, Any]:
    return Location(path.parent).digests(path.name)


@dataclass
class _Written:
    """A sample written to a shard, as its sidecar row needs it (the image's sha256, not the image)."""

    key: str
    label: int
    image_ext: str
    image_sha256: str
    metadata: dict[str, Any]

    @classmethod
    def of(cls, sample: ShardSample) -> "_Written":
        return cls(sample.key, int(sample.label), sample.image_ext, hashlib.sha256(sample.image).hexdigest(),
                   sample.metadata)

    def row(self, shard: str) -> dict[str, Any]:
        row: dict[str, Any] = {"key": self.key, "shard": shard, "label": self.label, "image_ext": self.image_ext,
                               "image_sha256": self.image_sha256}
        _flatten("", self.metadata, row)
        return row


def _columnar_sidecar(written: list[_Written], shard: str, schema: pa.Schema) -> pa.Table | None:
    """The sidecar of samples whose metadata share one layout of scalars and flat dicts (keys in one order),
    as `sidecar_table` makes it from their rows; None when they do not (the row path then says what differs).
    A dict's values are pulled out for all samples at once (a tuple of values each, then `zip` into columns)."""
    metas = [w.metadata for w in written]
    tops = tuple(metas[0])
    if any(tuple(m) != tops for m in metas):
        return None
    columns: dict[str, Any] = {"key": [w.key for w in written], "shard": [shard] * len(written),
                               "label": [w.label for w in written], "image_ext": [w.image_ext for w in written],
                               "image_sha256": [w.image_sha256 for w in written]}
    for top in tops:
        values = [m[top] for m in metas]
        if type(values[0]) is not dict:
            columns[top] = values
            continue
        inner = tuple(values[0])
        if any(type(d) is not dict or tuple(d) != inner for d in values):
            return None
        rows = [tuple(d.values()) for d in values]  # (the keys are `inner`, in order: checked above)
        for sub, column in zip(inner, zip(*rows)):
            columns[f"{top}_{sub}"] = column
    if list(columns) != schema.names:
        return None
    try:
        table = pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a value of another kind (a list, a dict) where a scalar goes
        return None
    nulls = [name for name, col in zip(table.column_names, table.columns) if col.null_count]
    if nulls:
        raise ValueError(f"sidecar: null in {nulls[:5]}; the sample schema allows none")
    return table


class ShardFileWriter:
    """Writes one shard (tar + parquet sidecar) sample by sample; `close()` commits both by rename and returns
    their done-record entries (digests of the bytes written)."""

    def __init__(self, out: "Location | Path | str", name: str, sidecar_schema: pa.Schema | None = None):
        self.out = location(out)
        self.name = name
        self.sidecar_schema = sidecar_schema
        self.tmp_path = self.out.stage(name)
        self._file = open(self.tmp_path, "wb", buffering=1 << 20)
        self._offset = 0
        self._headers = _MemberHeaders(FIXED_MTIME, 0o644, "mifa", "mifa")
        # per sample, in order: its sidecar row (copied) or what makes it (written; the image is not kept)
        self.entries: list[dict[str, Any] | _Written] = []
        self.keys: list[str] = []

    @property
    def sidecar_name(self) -> str:
        return self.name.removesuffix(".tar") + ".parquet"

    def write(self, sample: ShardSample) -> None:
        self._check_order(sample.key)
        members = to_wds(sample)
        key = members.pop("__key__")
        for ext in sorted(members):  # TarWriter's member order
            self._append(self._headers.member(f"{key}.{ext}", members[ext]))
        self.entries.append(_Written.of(sample))
        self.keys.append(sample.key)

    def copy(self, key: str, segment: bytes, row: dict[str, Any]) -> None:
        """Append a sample as the raw tar bytes another mifa shard holds for it (see `tar_segments`), with its
        sidecar row: the same bytes `write` would produce for the same members, without re-encoding anything."""
        self._check_order(key)
        self._append([segment])
        self.entries.append(row)
        self.keys.append(key)

    def _append(self, parts: list[bytes]) -> None:
        for part in parts:
            self._file.write(part)
            self._offset += len(part)

    def sidecar(self) -> pa.Table:
        """The sidecar of the samples so far. Written samples of one layout (what a build writes) are laid out
        column by column (about twice as fast as a row each); copies, or a sample of another layout, go
        through rows, whose check names what differs."""
        written = [e for e in self.entries if isinstance(e, _Written)]
        if self.sidecar_schema is not None and written and len(written) == len(self.entries):
            table = _columnar_sidecar(written, self.name, self.sidecar_schema)
            if table is not None:
                return table
        rows = [e.row(self.name) if isinstance(e, _Written) else e for e in self.entries]
        return sidecar_table(rows, self.sidecar_schema)

    def _check_order(self, key: str) -> None:
        if self.keys and key <= self.keys[-1]:
            raise ValueError(f"shard {self.name}: key {key!r} is not after {self.keys[-1]!r}")

    def close(self) -> dict[str, dict[str, Any]]:
        """Commit the sidecar, then the tar (each whole or absent, see `storage.Location.commit`); returns
        {file: its entry (`storage.digest_pieces`)} of both, for the done record (the tar is hashed while the
        sidecar is built)."""
        self._append([archive_end(self._offset)])
        self._file.close()
        hashing = _hashing().submit(file_digests, self.tmp_path)
        try:
            sidecar = self.out.write_parquet(self.sidecar_name, self.sidecar())
        finally:
            tar = hashing.result()
        self.out.commit(self.tmp_path, self.name)
        return {self.sidecar_name: sidecar, self.name: tar}

    def abort(self) -> None:
        """Drop the half-written shard. Errors while closing (a full disk again) are swallowed: the file is
        discarded anyway, and the error that made us abort is the one the user must see."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001
            pass
        discard(self.tmp_path)


def write_shard_index(out: "Location", name: str, shards: list[ShardInfo]) -> str:
    """wids-shard-index-v1 with URLs relative to the index, so the folder can move."""
    index = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [{"url": s.path, "nsamples": s.nsamples, "filesize": s.bytes, "md5sum": s.md5} for s in shards],
    }
    out.write_text(SHARD_INDEX, json.dumps(index, indent=2, sort_keys=False) + "\n")
    return SHARD_INDEX


def atomic_write_text(path: Path, text: str) -> None:
    """A local text file, whole or absent (see `storage.Location.commit`)."""
    Location(path.parent).write_text(path.name, text)
