"""The package version (read by setup.py; re-exported as ``prefopt_fast.__version__``)."""

__version__ = "0.1.0"
