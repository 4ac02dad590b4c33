"""What tests compare outputs by: every published file's sha256, wherever the output lives."""

import hashlib

from mifa_pipeline.storage import location


def digests(where) -> dict[str, str]:
    """Every published file (shards, sidecars, scores tables, identity table, index) by content; `where` is a
    folder or any storage URL. The run manifest and the card (they record times and dates) and `_work/` are
    left out."""
    folder = location(str(where))
    names = [n for n in folder.find()
             if not n.startswith(("_work", "manifest.json", ".mifa-lock", "README.md", "croissant.json"))]
    return {n: hashlib.sha256(folder.read_bytes(n)).hexdigest() for n in names}
