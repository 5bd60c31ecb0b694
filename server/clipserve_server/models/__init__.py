"""The model interface, one module per model family, loading and memory checks."""
