"""The protocol-neutral chat core: requests, the service that answers them, and its events."""

__all__: list[str] = []
