"""Numerics (layer 1): exact spectra, metrics, MPO bond spectra, scratch buffers, threads."""
