"""Fused and quantized kernels: cpu/ (native C sources and their loader), and the layer ops the model calls."""
