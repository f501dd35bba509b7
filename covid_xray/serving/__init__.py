"""Web serving: the Flask app factory (``create_app``), its page, static files and JSON API.

``create_app`` is imported on first use (PEP 562), so ``covid_xray.serving.settings`` (the CLI's
option checks) can be imported without TensorFlow.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from covid_xray.serving.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
