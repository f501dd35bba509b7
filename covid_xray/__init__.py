"""covid-xray: a reproducible DVC pipeline for COVID-19 detection in chest X-rays.

Educational and research use only: not a diagnostic device.
"""

__version__ = "0.1.0"
