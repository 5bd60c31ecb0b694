"""The gRPC edges: the servicer, its wire format and status codes, auth/TLS, and the model
registry the servicer routes through."""
