"""Loaded first by pytest: the optimized BLAS must be chosen before anything imports MLX, as the server does.

Property tests run derandomized (hypothesis's ``ci`` profile here): the same
examples every run, so CI fails only on a real change.  ``make fuzz``
(``FUZZ_RANDOMIZED=1``) draws new examples each run, to hunt for new cases.

No test needs the internet: huggingface_hub (and every server a test starts)
stays offline unless a test points it at the stand-in hub on 127.0.0.1.

``make test`` runs the tests on two pytest-xdist workers, one per core here;
BLAS then runs one thread per process (every server a test starts included),
as two workers' BLAS threads would otherwise wait on each other's cores.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hypothesis import settings

from mlx_server.blas import preload_optimized_blas

preload_optimized_blas()

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None)
settings.load_profile("fuzz" if os.environ.get("FUZZ_RANDOMIZED") == "1" else "ci")
