"""The ``controlset`` command: a thin layer over pipelines, annotators and training."""

__version__ = "0.1.0"
