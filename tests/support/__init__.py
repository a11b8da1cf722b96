"""Helpers of the test suite, imported as a package (``from support.gunicorn import Gunicorn``)."""
