"""The HTTP edge: the application, its middleware (keys, body size, queue), metrics, and errors as responses."""

__all__: list[str] = []
