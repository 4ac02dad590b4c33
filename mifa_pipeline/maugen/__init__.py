"""MAUGen model package: MRL + DIG networks and joint image + AU-label sampling. Imports nothing of the pipeline or Ray.

Exports resolve lazily, so ``mifa_pipeline.maugen.cli`` can be mounted by the project CLI without importing
torch, diffusers and transformers until a command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MAUGen", "MAUGenOutput"]

if TYPE_CHECKING:
    from .model import MAUGen
    from .sampler import MAUGenOutput


def __getattr__(name: str) -> Any:
    if name == "MAUGen":
        from .model import MAUGen

        return MAUGen
    if name == "MAUGenOutput":
        from .sampler import MAUGenOutput

        return MAUGenOutput
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
