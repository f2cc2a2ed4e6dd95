"""mimscale: masked image modeling pretraining at cluster scale."""

__version__ = "0.1.0"
