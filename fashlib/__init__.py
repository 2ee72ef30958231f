"""fashlib: clothes retrieval by metric learning, the library behind the course."""

__version__ = "0.1.0"
