"""Web serving: the Flask app factory (``covid_xray.serving.app.create_app``), its page, static
files and JSON API, and the server's option checks (``covid_xray.serving.settings``).

Nothing is imported here, so the CLI can check options without loading TensorFlow.
"""
