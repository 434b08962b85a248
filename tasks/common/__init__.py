"""What both flows use: runtime (Prefect server, Dask), atomic writes, reports."""
