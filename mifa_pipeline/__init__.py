"""mifa: build MIFA-style face + AU-label data sets with MAUGen."""
__version__ = "0.1.0"
