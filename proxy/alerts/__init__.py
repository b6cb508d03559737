"""Alerting helpers: ``infermon retrain-hook``, Alertmanager's webhook for an automated retraining job."""
