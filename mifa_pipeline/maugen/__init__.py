"""MAUGen model package: MRL + DIG networks and joint image + AU-label sampling. Imports nothing of the pipeline or Ray."""
