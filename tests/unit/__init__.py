"""Unit tests: the engine's parts (batcher, caches, promises), decoding and preprocessing,
fetching and the config, with the fake model or none, and no server."""
