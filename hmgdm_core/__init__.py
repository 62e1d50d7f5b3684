"""H-MGDM science: entity graphs from slides, the graph diffusion model, training and evaluation.

Nothing here knows about Flower; `client/` and `server/` translate messages into calls here.
"""

__version__ = "0.1.0"
