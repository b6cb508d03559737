"""Deployment helpers: ``infermon inject`` (the sidecar added to Kubernetes manifests) and the
container image's health check. Nothing here runs on the request path."""
