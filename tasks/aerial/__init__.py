"""Aerial-ground scenes (AerialMegaDepth): Earth Studio ingest, MegaDepth preprocessing, registration."""

# First import of pycolmap in any process that uses these stages, with the process's own SIGTERM handling
# kept: pycolmap's handler would turn a cancellation's SIGTERM into an abort with a stack trace.
from tasks.common.signals import import_pycolmap as _import_pycolmap

_import_pycolmap()
