"""Spectra's HTTP layer: FastAPI routes over one engine (``server.api.app.create_app``)."""
