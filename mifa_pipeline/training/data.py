"""Labelled face data sets in the build's shard format, loaded into memory for training.

A data folder is what ``mifa build`` / ``mifa teacher`` write: ``*.tar`` WebDataset shards (``KEY.png``,
``KEY.json`` with ``prompt``, ``identity``, ``intensity``, ``demographics``; ``KEY.cls``), ``manifest.json``
(``au_names``) and ``identities.parquet``, the identity table a build publishes beside its shards (one row
per identity: ``reference_png``, ``mask_png`` 255 = region to generate, ``prompt``; only those columns and
``identity`` are read). The table is required (a folder without it raises FileNotFoundError: a data set built
before the shard redesign kept it in its private ``_work/``, which nothing here reads; rebuild it). Every
identity of the shards needs a row; extra rows (e.g. duplicate identities, which have no samples) are ignored.
Several folders are concatenated; identities are numbered globally (folder, identity) -> 0..I-1.
A folder may also hold ``identity_attributes.parquet`` (``identity`` plus float columns, e.g. the teacher's
face-shape parameters or a user's 3DMM shape coefficients): numbers each identity's ``<ID>`` words are
trained to predict (``--identity-attribute-weight``).

Everything is decoded once into uint8 tensors (64 px: ~12 KB per sample), so a training step only indexes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mifa_pipeline.storage import Location, location

ATTRIBUTES_FILE = "identity_attributes.parquet"
IDENTITIES_FILE = "identities.parquet"   # the identity table a build publishes beside its shards

# The build manifest's default inpainting ellipse (mifa_pipeline.config.EllipseMask), as fractions.
DEFAULT_ELLIPSE = (0.5, 0.45, 0.3, 0.4)


@dataclass
class FaceData:
    au_names: list[str]
    images: torch.Tensor                 # [N,3,H,W] uint8, the generated / rendered faces
    prompts: list[str]                   # MIFA-style, with the "<ID> <ID2>" placeholder
    identity: torch.Tensor               # [N] int64, global identity index
    intensity: torch.Tensor              # [N,A] float32 0..5
    ref_images: torch.Tensor             # [I,3,H,W] uint8, one reference face per identity
    ref_masks: torch.Tensor              # [I,1,H,W] uint8 255 = region to generate
    ref_prompts: list[str]               # identity prompt (describes the reference) per identity
    identity_names: list[str]            # "folder#id" per global identity
    keys: list[str] = field(default_factory=list)
    attribute_names: list[str] = field(default_factory=list)
    identity_attributes: torch.Tensor | None = None   # [I,K] float32, or None when a folder has none

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_identities(self) -> int:
        return len(self.identity_names)

    def subset_identities(self, keep: list[int]) -> "FaceData":
        """Only the samples (and references) of the identities in ``keep``, renumbered 0..len(keep)-1."""
        remap = {old: new for new, old in enumerate(keep)}
        rows = [i for i, ident in enumerate(self.identity.tolist()) if ident in remap]
        idx = torch.tensor(rows, dtype=torch.long)
        keep_t = torch.tensor(keep, dtype=torch.long)
        return FaceData(
            au_names=list(self.au_names), images=self.images[idx], prompts=[self.prompts[i] for i in rows],
            identity=torch.tensor([remap[self.identity[i].item()] for i in rows], dtype=torch.long),
            intensity=self.intensity[idx], ref_images=self.ref_images[keep_t], ref_masks=self.ref_masks[keep_t],
            ref_prompts=[self.ref_prompts[i] for i in keep], identity_names=[self.identity_names[i] for i in keep],
            keys=[self.keys[i] for i in rows] if self.keys else [],
            attribute_names=list(self.attribute_names),
            identity_attributes=None if self.identity_attributes is None else self.identity_attributes[keep_t],
        )


def _decode_rgb(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8).copy()


def _decode_mask(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("L")
        if img.size != (size, size):
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.NEAREST)
        return np.where(np.asarray(img) >= 128, 255, 0).astype(np.uint8)


def ellipse_mask(size: int, ellipse: tuple[float, float, float, float] = DEFAULT_ELLIPSE) -> np.ndarray:
    cx, cy, rx, ry = ellipse
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    inside = ((xx / size - cx) / rx) ** 2 + ((yy / size - cy) / ry) ** 2 <= 1.0
    return np.where(inside, 255, 0).astype(np.uint8)


def identity_prompt(demographics: dict[str, str]) -> str:
    """The build's identity prompt (stages/prompts.py) for a sample's demographics."""
    from mifa_pipeline.stages.prompts import describe_person

    return (f"a close-up portrait photo of {describe_person(demographics)}, neutral expression, "
            "looking at the camera, soft studio lighting")


def _read_shards(folder: Location):
    shards = [n for n in folder.listdir() if n.endswith(".tar")]
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.tar shards")
    for shard in shards:
        groups: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(folder.read_bytes(shard)), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                groups.setdefault(key, {})[ext] = tf.extractfile(member).read()
        for key in sorted(groups):
            yield key, groups[key]


def _identity_table(folder: Location, idents: set[int]) -> dict[int, dict]:
    """Reference face, mask and prompt of each identity in ``idents``, from ``folder/identities.parquet``."""
    path = folder.full_url(IDENTITIES_FILE)
    if not folder.isfile(IDENTITIES_FILE):
        if folder.exists("_work/units"):
            raise FileNotFoundError(f"{folder}: no {IDENTITIES_FILE}: a data set of mifa's earlier layout; rebuild it")
        return {}  # not a mifa build: references are chosen from the samples (see load_folder)
    columns = ["identity", "reference_png", "mask_png", "prompt"]
    available = set(folder.parquet_schema(IDENTITIES_FILE).names)
    missing_columns = [c for c in columns if c not in available]
    if missing_columns:
        raise ValueError(f"{path}: no column(s) {missing_columns} (columns: {sorted(available)})")
    out = {int(row["identity"]): row for row in folder.read_parquet(IDENTITIES_FILE, columns=columns).to_pylist()
           if int(row["identity"]) in idents}
    missing = sorted(idents - set(out))
    if missing:
        raise ValueError(f"{path}: identities {missing[:5]} of the shards have no row ({len(missing)} in all)")
    return out


def _attributes(folder: Location, order: list[int]) -> tuple[list[str], torch.Tensor | None]:
    """The folder's per-identity attribute table, in ``order``; every identity must have a finite row."""
    path = folder.full_url(ATTRIBUTES_FILE)
    if not folder.isfile(ATTRIBUTES_FILE):
        return [], None
    table = folder.read_parquet(ATTRIBUTES_FILE).to_pydict()
    if "identity" not in table:
        raise ValueError(f"{path}: no 'identity' column (columns: {sorted(table)})")
    names = [k for k in table if k != "identity"]
    if not names:
        raise ValueError(f"{path}: no attribute columns besides 'identity'")
    rows = {int(i): [table[k][r] for k in names] for r, i in enumerate(table["identity"])}
    missing = [i for i in order if i not in rows]
    if missing:
        raise ValueError(f"{path}: identities {missing[:5]} of the shards have no row ({len(missing)} in all)")
    values = torch.tensor([rows[i] for i in order], dtype=torch.float32)
    if not torch.isfinite(values).all():
        raise ValueError(f"{path}: attributes must be finite numbers")
    return names, values


def load_folder(where: "str | Path | Location", resolution: int) -> FaceData:
    """One data set (a folder or a URL) in memory."""
    folder = location(where)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: does not exist")
    au_names = json.loads(folder.read_text("manifest.json"))["au_names"] if folder.isfile("manifest.json") else None
    images, prompts, idents, intens, keys, demo_of = [], [], [], [], [], {}
    for key, parts in _read_shards(folder):
        meta = json.loads(parts["json"])
        img_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
        if img_ext is None:
            continue
        if au_names is None:
            au_names = list(meta["intensity"])
        images.append(_decode_rgb(parts[img_ext], resolution))
        prompts.append(meta["prompt"])
        ident = int(meta["identity"]) if "identity" in meta else int(parts["cls"])
        idents.append(ident)
        intens.append([float(meta["intensity"][au]) for au in au_names])
        keys.append(key)
        demo_of.setdefault(ident, meta.get("demographics") or {})
    if not images:
        raise ValueError(f"{folder}: the shards hold no images")
    order = sorted(set(idents))
    tables = _identity_table(folder, set(order))
    intensity = torch.tensor(intens, dtype=torch.float32)
    ref_images, ref_masks, ref_prompts = [], [], []
    for ident in order:
        row = tables.get(ident)
        if row is not None:
            ref_images.append(_decode_rgb(row["reference_png"], resolution))
            ref_masks.append(_decode_mask(row["mask_png"], resolution))
            ref_prompts.append(row["prompt"] or identity_prompt(demo_of[ident]))
        else:  # no identity table: the least expressive sample of the identity is its reference
            rows = [i for i, x in enumerate(idents) if x == ident]
            best = min(rows, key=lambda i: float(intensity[i].sum()))
            ref_images.append(images[best])
            ref_masks.append(ellipse_mask(resolution))
            ref_prompts.append(identity_prompt(demo_of[ident]))
    index = {ident: k for k, ident in enumerate(order)}
    attribute_names, attributes = _attributes(folder, order)
    return FaceData(
        au_names=list(au_names),
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        prompts=prompts,
        identity=torch.tensor([index[i] for i in idents], dtype=torch.long),
        intensity=intensity,
        ref_images=torch.from_numpy(np.stack(ref_images)).permute(0, 3, 1, 2).contiguous(),
        ref_masks=torch.from_numpy(np.stack(ref_masks))[:, None].contiguous(),
        ref_prompts=ref_prompts,
        identity_names=[f"{folder.name}#{i}" for i in order],
        keys=keys,
        attribute_names=attribute_names,
        identity_attributes=attributes,
    )


def load_data(folders: list[str | Path], resolution: int, au_names: list[str] | None = None) -> FaceData:
    """Load and concatenate data folders; all must share one AU list (and match ``au_names`` if given)."""
    parts = [load_folder(f, resolution) for f in folders]
    names = au_names or parts[0].au_names
    for folder, part in zip(folders, parts):
        if part.au_names != list(names):
            raise ValueError(f"{folder}: AU list {part.au_names} differs from {list(names)}")
    # identity attributes only when every folder has the same columns (else None: the trainer refuses
    # --identity-attribute-weight then; without it, folders with and without the table mix freely)
    with_attributes = all(p.identity_attributes is not None and p.attribute_names == parts[0].attribute_names
                          for p in parts)
    offset, idents = 0, []
    for part in parts:
        idents.append(part.identity + offset)
        offset += part.num_identities
    return FaceData(
        au_names=list(names),
        images=torch.cat([p.images for p in parts]),
        prompts=[s for p in parts for s in p.prompts],
        identity=torch.cat(idents),
        intensity=torch.cat([p.intensity for p in parts]),
        ref_images=torch.cat([p.ref_images for p in parts]),
        ref_masks=torch.cat([p.ref_masks for p in parts]),
        ref_prompts=[s for p in parts for s in p.ref_prompts],
        identity_names=[s for p in parts for s in p.identity_names],
        keys=[k for p in parts for k in p.keys],
        attribute_names=list(parts[0].attribute_names) if with_attributes else [],
        identity_attributes=torch.cat([p.identity_attributes for p in parts]) if with_attributes else None,
    )
