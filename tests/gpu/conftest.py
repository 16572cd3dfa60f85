"""The GPU path's tests run on CPU tensors under Triton's interpreter, so CI needs no GPU.

TRITON_INTERPRET must be set before triton is first imported: triton.jit reads it when a kernel is decorated.
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # Something imported triton before this conftest (a GPU test session): its kernels would compile for a GPU.
    import warnings

    warnings.warn("triton was imported before tests/gpu set TRITON_INTERPRET=1; kernels may not run on CPU",
                  stacklevel=1)
os.environ["TRITON_INTERPRET"] = "1"
