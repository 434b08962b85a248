"""MMEarth-style multimodal Earth-observation dataset: tiles, stacks, HDF5 packing."""
