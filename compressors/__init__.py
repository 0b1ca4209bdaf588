"""Compression methods: one module each, one registry (`compressors.registry.REGISTRY`)."""
