"""The HTTP face: the same models, caches, batching, fetcher, token and limits as gRPC, in
the shapes other tools already speak (OpenAI embeddings, KServe v2 REST, Weaviate's
multi2vec-clip), plus a JSON mirror of ScoreBatch. ``app.py`` builds and runs it."""
