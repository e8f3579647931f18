"""cachelab's Hydra launcher plugins (Hydra instantiates launchers only from ``hydra_plugins``)."""
