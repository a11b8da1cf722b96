"""The package's version: setup.cfg reads it (``attr:``), the OpenAPI document and the worker show it."""
__version__ = "0.1.0"
