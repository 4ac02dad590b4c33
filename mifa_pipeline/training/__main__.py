"""``python -m mifa_pipeline.training DATA... --out DIR``: the same command as ``mifa train``."""

from .cli import train_app

train_app(prog_name="mifa train")
