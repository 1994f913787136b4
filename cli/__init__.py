"""Command-line interface of vesuvius-dask (installed as ``vesuvius_dask.cli``).

Argument parsing only: each command imports the library inside its function.
"""
