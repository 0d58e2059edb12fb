"""Turning ``--model`` into a loaded model and tokenizer: GGUF files, MLX directories, cached hub repos."""

__all__: list[str] = []
