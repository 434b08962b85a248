"""Aerial-ground scenes (AerialMegaDepth): Earth Studio ingest, MegaDepth preprocessing, registration."""
