"""Bundled real multi-site medical data (offline) and data utilities."""
