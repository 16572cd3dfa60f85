"""Model building blocks whose weights are stored and run by a quantization method."""
