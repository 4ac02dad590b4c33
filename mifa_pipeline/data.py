"""Reading a published mifa data set into PyTorch: what teams that train on the data import.

Two views of one folder (a build or a `mifa filter` version), both yielding the same item per sample:

    {"key": str, "image": uint8 [3,H,W] (or float32 in [0,1]), "occurrence": int64 [A],
     "occurrence_prob": float32 [A], "intensity": float32 [A], "requested": int64 [A], "identity": int64 []}

with A the data set's AU order (`au_names` of its run manifest, also `MifaData.au_names`).

- `MifaIterable`: a streaming `IterableDataset` on webdataset. Shards are split by node (rank) and by
  DataLoader worker, so each sample is read once per epoch across all of them (given at least as many
  non-empty shards as ranks x workers; shard sizes vary with drops, so ranks may get unequal counts), with a
  seeded shuffle of the shard order and a shuffle buffer whose seed follows `set_epoch`.
- `MifaIndexed`: random access on the wids index (`shardindex.json`). wids caches shards by name; this one
  names each cached shard by the md5 the index records (a symlink for a local file, nothing copied), so a
  data set rebuilt into a folder of the same name is never served from an older build's cache.

Only torch, webdataset, wids, fsspec (for URLs), numpy and PIL are imported: no pipeline or model module, so a
training job needs nothing of the pipeline (this is why it opens URLs with fsspec itself, not through storage.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

MANIFEST = "manifest.json"
INDEX = "shardindex.json"
IMAGE_EXTENSIONS = ("png", "jpg", "webp")
Decode = Literal["uint8", "float"]


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def _read_json(folder: str, name: str) -> dict[str, Any]:
    """The one place this module reads a metadata file of a data set (a folder, or any fsspec URL)."""
    import fsspec

    try:
        with fsspec.open(_join(folder, name), "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {name}; is this a finished mifa data set?") from None


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    import fsspec

    return fsspec.open(url, mode).open()


def _fsspec_download(remote: str, local: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(remote)
    fs.get_file(path, local)


def register_url_schemes(urls: list[str]) -> None:
    """Let webdataset and wids open the URLs' schemes (s3://, gs://, ...) through fsspec, the way they open
    local paths, unless they already have a handler of their own for it."""
    from webdataset.gopen import gopen_schemes
    from wids.wids_dl import default_cmds

    for url in urls:
        if "://" in url:
            scheme = url.split("://", 1)[0]
            if scheme not in ("http", "https", "pipe", "file"):
                gopen_schemes[scheme] = _fsspec_open
                default_cmds[scheme] = _fsspec_download


@dataclass(frozen=True)
class MifaData:
    """A data set folder, resolved: its name, version, AU order and shards (from manifest and index)."""

    folder: str  # a folder or an fsspec URL
    name: str
    version: str
    au_names: tuple[str, ...]
    shards: tuple[dict[str, Any], ...]  # the wids index's entries: url (relative), nsamples, filesize, md5sum

    @property
    def num_samples(self) -> int:
        return sum(s["nsamples"] for s in self.shards)

    def urls(self, nonempty: bool = True) -> list[str]:
        """Absolute shard paths in index order (those holding samples, unless `nonempty=False`)."""
        return [_join(self.folder, s["url"]) for s in self.shards if s["nsamples"] or not nonempty]


def open_data(location: str | os.PathLike, version: str | None = None) -> MifaData:
    """The data set at `location`; with `version`, that version: the folder itself or its sibling
    `LOCATION-vVERSION` (where `mifa filter` puts a new version by default)."""
    folder = str(location).rstrip("/")
    parent, _, name = folder.rpartition("/")
    candidates = [folder] if version is None else [folder, f"{parent}/{name}-v{version}" if parent else f"{name}-v{version}"]
    for candidate in candidates:
        try:
            manifest = _read_json(candidate, MANIFEST)
        except FileNotFoundError:
            continue
        if version is None or manifest["dataset"]["version"] == version:
            index = _read_json(candidate, manifest.get("shard_index", INDEX))
            return MifaData(candidate, manifest["dataset"]["name"], manifest["dataset"]["version"],
                            tuple(manifest["au_names"]), tuple(index["shardlist"]))
    if version is None:
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; is this a finished mifa data set?")
    raise FileNotFoundError(f"version {version!r}: neither {folder} nor {name}-v{version} holds it")


def decode_sample(sample: dict[str, Any], au_names: tuple[str, ...], decode: Decode = "uint8") -> dict[str, Any]:
    """A sample's members (extension -> bytes, as webdataset or wids give them) -> the item described above."""
    members = {k.lstrip("."): (v.getvalue() if isinstance(v, io.BytesIO) else v) for k, v in sample.items()}
    meta = members["json"]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise ValueError(f"sample {meta.get('key')}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
    with Image.open(io.BytesIO(members[ext])) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    if decode == "float":
        image = image.float().div_(255.0)
    elif decode != "uint8":
        raise ValueError(f"decode {decode!r}: expected 'uint8' or 'float'")
    try:
        return {
            "key": meta["key"],
            "image": image,
            "occurrence": torch.tensor([meta["occurrence"][a] for a in au_names], dtype=torch.int64),
            "occurrence_prob": torch.tensor([meta["occurrence_prob"][a] for a in au_names], dtype=torch.float32),
            "intensity": torch.tensor([meta["intensity"][a] for a in au_names], dtype=torch.float32),
            "requested": torch.tensor([meta["requested_aus"][a] for a in au_names], dtype=torch.int64),
            "identity": torch.tensor(meta["identity"], dtype=torch.int64),
        }
    except KeyError as exc:
        raise ValueError(f"sample {meta.get('key')}: no label for {exc} (data set AU order {list(au_names)})") from None


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The caller's, else torch.distributed's (when initialised), else a single process."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MifaIterable(IterableDataset):
    """Streams a mifa data set's shards (webdataset): split by node and worker, shuffled per epoch.

    `shuffle`: shuffle buffer size in samples (0: shards and samples in index order). `seed` and the epoch
    (`set_epoch(e)` before iterating each epoch; DataLoader workers get a fresh copy per epoch unless
    `persistent_workers`) fix every shuffle. `transform(item) -> item` runs last, in the worker.
    `rank`/`world_size` default to torch.distributed's."""

    def __init__(self, location: str | os.PathLike, version: str | None = None, *, decode: Decode = "uint8",
                 transform: Callable[[dict[str, Any]], Any] | None = None, shuffle: int = 0, seed: int = 0,
                 split_by_node: bool = True, split_by_worker: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if decode not in ("uint8", "float"):
            raise ValueError(f"decode {decode!r}: expected 'uint8' or 'float'")
        self.data = open_data(location, version)
        self.au_names = self.data.au_names
        self.decode, self.transform, self.shuffle, self.seed = decode, transform, int(shuffle), int(seed)
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shards_for(self, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shard paths one (rank, worker) reads this epoch: the same shuffled order everywhere, then
        every world_size-th from `rank`, then every num_workers-th from `worker`."""
        urls = self.data.urls()
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(urls)
        if self.split_by_node:
            urls = urls[rank::world_size]
        if self.split_by_worker:
            urls = urls[worker::num_workers]
        return urls

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        rank, world = _rank_and_world(self.rank, self.world_size)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.shards_for(rank, world, worker, workers)
        if not urls:  # more ranks x workers than shards: this one reads nothing (wds refuses an empty list)
            return iter(())
        register_url_schemes(urls)
        stages: list[Any] = [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}:{rank}:{worker}")
            stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100), rng=rng))
        stages.append(lambda samples: map(self._item, samples))  # (wds.map would add __key__ back)
        return iter(wds.DataPipeline(*stages))

    def _item(self, sample: dict[str, Any]) -> Any:
        item = decode_sample(sample, self.au_names, self.decode)
        return self.transform(item) if self.transform is not None else item


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"mifa-wids-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


class ContentLocalname:
    """wids `localname`: a shard's cache name starts with its md5 (from the index), so another build's shard of
    the same name is another cache entry. A local shard is linked (named by its path too), never copied."""

    def __init__(self, shards: list[dict[str, Any]], cache_dir: Path):
        self.md5 = {s["url"]: s["md5sum"] for s in shards}
        self.cache_dir = cache_dir

    def __call__(self, url: str) -> str:
        folder = self.cache_dir / self.md5[url]
        folder.mkdir(parents=True, exist_ok=True)
        if "://" in url:
            return str(folder / Path(url).name)  # wids downloads it there once
        target = os.path.abspath(url)
        local = folder / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}-{Path(url).name}"
        if not (local.is_symlink() and os.readlink(local) == target):
            link = local.with_name(f".{local.name}.{os.getpid()}")
            link.unlink(missing_ok=True)
            os.symlink(target, link)
            os.replace(link, local)  # (atomic: a worker never sees a half-made or stale link)
        return str(local)


class MifaIndexed(Dataset):
    """Random access (`ds[i]`, `len(ds)`) to a mifa data set through its wids index, in index order.
    The item is `MifaIterable`'s; `transform` runs last. `cache_dir`: where wids keeps shards (by md5)."""

    def __init__(self, location: str | os.PathLike, version: str | None = None, *, decode: Decode = "uint8",
                 transform: Callable[[dict[str, Any]], Any] | None = None, cache_dir: str | os.PathLike | None = None):
        import wids

        if decode not in ("uint8", "float"):
            raise ValueError(f"decode {decode!r}: expected 'uint8' or 'float'")
        self.data = open_data(location, version)
        self.au_names = self.data.au_names
        self.decode, self.transform = decode, transform
        shards = [{**s, "url": _join(self.data.folder, s["url"])} for s in self.data.shards if s["nsamples"]]
        register_url_schemes([s["url"] for s in shards])
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.wids = wids.ShardListDataset(shards, localname=ContentLocalname(shards, cache), transformations=[],
                                          dataset_name=f"{self.data.name}-{self.data.version}")

    def __len__(self) -> int:
        return len(self.wids)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index}: the data set holds {len(self)} samples")
        sample = self.wids[index % len(self)]
        item = decode_sample({k: v for k, v in sample.items() if not k.startswith("__")}, self.au_names, self.decode)
        return self.transform(item) if self.transform is not None else item
