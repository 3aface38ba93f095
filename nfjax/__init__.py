"""nfjax: generative modeling of neural fields in JAX/Flax."""

__version__ = "0.1.0"
