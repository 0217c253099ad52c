"""Backends: each module implements the row-kernel contract of ``prefopt_fast._rows``."""
