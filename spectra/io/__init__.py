"""Weight I/O (layer 1): safetensors and GGUF headers, model sources, roles, the cache."""
