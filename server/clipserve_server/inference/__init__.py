"""One model's serving core: the engine, its dynamic batcher and embedding caches."""
