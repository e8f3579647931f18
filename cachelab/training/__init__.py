"""Training of the project's own small models (the embedded digits DiT and its judge)."""
