"""Domain code of the dataset factory: plain functions plus thin Prefect task wrappers."""
