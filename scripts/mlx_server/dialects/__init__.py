"""One module per API dialect: each translates its wire format to and from the chat core."""

__all__: list[str] = []
