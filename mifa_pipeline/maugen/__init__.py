"""MAUGen model package: MRL + DIG networks and joint image + AU-label sampling. Imports nothing of the pipeline or Ray."""

from .model import MAUGen
from .sampler import MAUGenOutput

__all__ = ["MAUGen", "MAUGenOutput"]
