"""The gRPC edges: the servicer, its lenient request decoding and status codes, auth/TLS, and the model
registry the servicer routes through."""
