"""MAUGen model package: MRL + DIG networks and joint image + AU-label sampling. Imports nothing of the pipeline or Ray.

The heavy modules (torch, diffusers, transformers) load on first use of `MAUGen`/`MAUGenOutput`, so the
CLI can mount `maugen.cli` without slowing `mifa --help`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import MAUGen
    from .sampler import MAUGenOutput

__all__ = ["MAUGen", "MAUGenOutput"]


def __getattr__(name: str):
    if name == "MAUGen":
        from .model import MAUGen

        return MAUGen
    if name == "MAUGenOutput":
        from .sampler import MAUGenOutput

        return MAUGenOutput
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
