"""DVC stage entry points: one thin ``main()`` each, run as ``python -m stages.<name>``."""
