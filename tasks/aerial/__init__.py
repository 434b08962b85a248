"""Aerial-ground scenes (AerialMegaDepth): Earth Studio ingest, MegaDepth preprocessing, registration."""

# pycolmap loads with the first module that uses it, not with this package; whichever module that
# is, the import keeps the process's own SIGTERM handling (pycolmap's handler would turn a
# cancellation's SIGTERM into an abort with a stack trace) and routes COLMAP's log.
from tasks.common.signals import guard_pycolmap_import

guard_pycolmap_import()
