"""Triton kernels of the GPU path (imported only where triton is installed).

paged_attention  reshape_and_cache, paged decode attention (split along the sequence + reduce), paged
                 prefill / chunked-prefill attention; used by tokenmill.attention.triton_backend
layer_ops        fused RMSNorm (+ residual add), in-place rotary embedding, SiLU-and-multiply for the model's
                 elementwise stages on CUDA
"""
