"""Scheduled deployments of the flows (``python -m deployments.serve``)."""
