"""Shadow traffic: a share of requests mirrored to a shadow upstream and compared (docs/canary.md)."""

from proxy.shadow.observer import ShadowConfig, ShadowObserver

__all__ = ["ShadowConfig", "ShadowObserver"]
