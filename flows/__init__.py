"""Prefect flows: one module per dataset kind, each runnable with python -m flows.<name>."""
