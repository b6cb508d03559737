"""infermon: a monitoring sidecar for ML inference APIs."""

__version__ = "0.1.0"
