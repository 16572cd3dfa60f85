"""CPU threading: OpenMP's wait policy and torch's thread count.

The model's matmuls (oneDNN and MKL inside torch) and tokenmill's native kernels run their parallel loops on
torch's OpenMP runtime (GNU libgomp in the PyTorch wheels). By default, libgomp keeps a thread that finishes
its share of a parallel loop spinning for 300,000 rounds before it sleeps. A decode step runs hundreds of
short parallel loops with Python work between them, so those threads spin through most of the step. On an
idle machine that costs nothing; on a CPU that other processes also use, the spinning threads take the time
slices that the thread with the work needs, and one 32-token request went from 3 s to 28-42 s
(BENCHMARKS.md, "Offline generation on a shared CPU"). With OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps
at once, and the same request takes 1-4 s whatever else runs. On an idle machine sleeping costs ~0.5 s on a
lone 32-token request and ~20% of throughput; a dedicated machine gets that back with GOMP_SPINCOUNT=30000 or
OMP_WAIT_POLICY=ACTIVE in the environment, which tokenmill leaves alone.

libgomp reads its environment once, when it is loaded (at `import torch`), so the default has to be in the
environment before that: `import tokenmill` sets it (tokenmill/__init__.py), unless the user chose a wait
policy (any of OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME set). If torch was imported first, it is too
late, and the engine says so in a warning.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("tokenmill")

# Environment variables through which a user picks an OpenMP wait policy (GNU and Intel runtimes).
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

# Whether `import tokenmill` set OMP_WAIT_POLICY itself, and whether torch was already loaded when it tried.
_state = {"set_by_tokenmill": False, "torch_loaded_first": False}


def configure_openmp_env() -> None:
    """Make waiting OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE) unless the user chose a wait policy.
    Called from tokenmill/__init__.py, before anything imports torch."""
    if any(var in os.environ for var in WAIT_POLICY_VARS):
        return
    _state["torch_loaded_first"] = "torch" in sys.modules
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _state["set_by_tokenmill"] = True


def check_cpu_threads() -> None:
    """At engine start on CPU: warn when the wait policy could not take effect, and keep torch's thread count
    within the CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    import torch

    if _state["set_by_tokenmill"] and _state["torch_loaded_first"]:
        logger.warning(
            "torch was imported before tokenmill, so OpenMP threads keep spin-waiting between parallel loops: "
            "on a CPU shared with other busy processes generation can be 10x slower. Set OMP_WAIT_POLICY=PASSIVE "
            "in the environment, or import tokenmill before torch"
        )
    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        logger.info("torch used %d threads on %d usable CPUs: lowered to %d", torch.get_num_threads(), usable,
                    usable)
        torch.set_num_threads(usable)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), or the machine's count where there is no mask."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
