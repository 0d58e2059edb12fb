"""Loaded first by pytest: the optimized BLAS must be chosen before anything imports MLX, as the server does.

Property tests run derandomized (hypothesis's ``ci`` profile here): the same
examples every run, so CI fails only on a real change.  ``make fuzz``
(``FUZZ_RANDOMIZED=1``) draws new examples each run, to hunt for new cases.
"""

import os

from hypothesis import settings

from mlx_server.blas import preload_optimized_blas

preload_optimized_blas()

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None)
settings.load_profile("fuzz" if os.environ.get("FUZZ_RANDOMIZED") == "1" else "ci")
