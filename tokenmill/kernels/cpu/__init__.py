"""Native CPU kernels (csrc/), compiled at first use: ops.py builds and calls the library."""
