"""cachelab: training-free feature caching for diffusion transformers."""
