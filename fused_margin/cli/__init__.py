"""The `fused-margin` command-line application: train (train.py, data.py),
bench (bench.py) and reproduce (reproduce.py), parsed in main.py. It uses the
library only through its public layer; the library never imports it."""
from .main import main

__all__ = ["main"]
