"""Deviation-weighted preference training engine (DDPO / DORPO and their unweighted bases)."""

__version__ = "0.1.0"
