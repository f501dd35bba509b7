"""Web serving: the Flask app factory (``create_app``), its page, static files and JSON API."""

from covid_xray.serving.app import create_app

__all__ = ["create_app"]
