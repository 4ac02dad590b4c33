"""Time an epoch of a data set through `mifa_pipeline.data.MifaIterable` (a DataLoader, as training reads it).

    python benchmarks/loader.py out/demo [--workers 2] [--batch 32] [--epochs 3] [--shuffle 256]

Prints samples, seconds and samples/s per epoch (the first includes worker start-up)."""

from __future__ import annotations

import argparse
import time

import torch

from mifa_pipeline.data import MifaIterable


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shuffle", type=int, default=256)
    parser.add_argument("--decode", default="float", choices=["uint8", "float"])
    args = parser.parse_args()
    data = MifaIterable(args.folder, shuffle=args.shuffle, decode=args.decode)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, num_workers=args.workers)
    print(f"{args.folder}: {data.data.num_samples} samples in {len(data.data.urls())} non-empty shards, "
          f"{args.workers} workers, batch {args.batch}, decode {args.decode}")
    for epoch in range(args.epochs):
        data.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["key"])
        seconds = time.perf_counter() - start
        print(f"epoch {epoch}: {n} samples in {seconds:.3f} s ({n / seconds:.0f} samples/s)")


if __name__ == "__main__":
    main()
