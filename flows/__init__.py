"""Prefect flows that wire the ``cohort`` library into runs on Dask."""
