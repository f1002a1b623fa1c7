"""Federator: federated learning as a Kubernetes operator, and on one machine with `federator run`."""

__version__ = "0.1.0"
