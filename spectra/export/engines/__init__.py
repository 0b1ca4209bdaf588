"""Scripts that `spectra serve-check` runs in an engine's own virtual environment (by
path, never imported: they import no spectra). Each reads a job (JSON: the export, the
evaluation windows as token ids, how many tokens to decode) and writes a result (JSON:
loaded, the negative log-likelihood summed over the windows' predicted tokens, load,
prefill and decode seconds, or the engine's own error)."""
