"""Spectra's HTTP layer: FastAPI routes over one :class:`~server.engine.engine.Engine`."""

from server.api.app import create_app

__all__ = ["create_app"]
