"""Data (layer 3): corpora and perplexity, calibration windows, peak memory of a run."""
