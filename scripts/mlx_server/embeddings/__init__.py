"""Embeddings: a request's inputs as vectors from an embedding model (the sibling of ``chat``)."""

__all__: list[str] = []
