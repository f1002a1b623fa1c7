"""Flower app for the Federator-vs-Flower benchmark (the same task as Federator's quickstart)."""
