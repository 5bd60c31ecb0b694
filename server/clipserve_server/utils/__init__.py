"""What every layer reads: configuration, domain dataclasses, error kinds, metrics, logging and
thread settings."""
