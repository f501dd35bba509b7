"""The project's user-facing exceptions, in a module that imports nothing of the package.

Every module may raise them (config, io, params, the stages...) without importing another
module for it, so no import cycle can form around them. ``run_stage`` and the CLI print them as
one line, without a traceback.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A user-fixable problem (bad input file, missing column...). Printed without a traceback."""


class ParamsError(ValueError):
    """A params.yaml key is unknown, or its value is missing, of the wrong type or out of range."""
