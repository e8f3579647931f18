"""Model families: architectures and the adapters that tell cachelab how to drive them."""
