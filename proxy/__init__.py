"""infermon: a monitoring sidecar for ML inference APIs."""

from proxy import _compiled as _compiled  # before any data-plane import: compiled or pure Python

__version__ = "0.1.0"
