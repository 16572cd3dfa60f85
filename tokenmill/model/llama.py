"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) over a flat batch of tokens.

Differences inside the family are flags on DecoderSpec: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings, explicit head_dim, llama3 RoPE scaling, sliding window.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.distributed import get_pp_group, get_tp_group, tensor_model_parallel_gather
from tokenmill.kernels.cpu.decode import FusedDecoder
from tokenmill.model.layers.linear import Linear, TensorParallelShard, TiedLMHead, VocabEmbedding
from tokenmill.model.quantization.base import QuantizationConfig
from tokenmill.model.quantization.unquantized import UnquantizedConfig
from tokenmill.model.registry import DecoderSpec
from tokenmill.planner.memory import pipeline_stage_layers


@functools.cache
def _cuda_layer_ops() -> ModuleType | None:
    """Fused Triton kernels for RMSNorm, RoPE and SiLU-and-mul, used on CUDA tensors when Triton is present."""
    try:
        from tokenmill.attention.triton import layer_ops
    except ImportError:
        return None
    return layer_ops


@functools.cache
def _cpu_layer_ops() -> ModuleType | None:
    """The native CPU versions of the same kernels (bfloat16), when they are built and vectorized here."""
    from tokenmill.kernels.cpu import ops as cpu_kernels

    return cpu_kernels if cpu_kernels.layer_ops_supported() else None


def _layer_ops(x: torch.Tensor) -> ModuleType | None:
    """Fused kernels for x's device and dtype (same functions, same arithmetic as the PyTorch code here), or
    None where plain PyTorch runs: float32 and float16 on CPU, or no kernels available."""
    if x.is_cuda:
        return _cuda_layer_ops()
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return _cpu_layer_ops()
    return None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of x; with residual, of x + residual, returning (normed, x + residual) - the residual add of
        the previous sublayer folded into this norm (in place on residual where a fused kernel runs)."""
        if (ops := _layer_ops(x)) is not None:
            hidden = x.shape[-1]
            if residual is None:
                return ops.rms_norm(x.reshape(-1, hidden), self.weight, self.eps).view(x.shape)
            out = ops.rms_norm(x.reshape(-1, hidden), self.weight, self.eps, residual=residual.view(-1, hidden))
            return out.view(x.shape), residual
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 as the reference implementation does, then back to the activation dtype.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(spec: DecoderSpec) -> torch.Tensor:
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by factor, short ones kept, the band between interpolated smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, spec: DecoderSpec, max_positions: int) -> None:
        super().__init__()
        if torch.empty(0).device.type == "meta":
            # Built on the meta device for a checkpoint (the loader makes the real tables on the real device):
            # only the shapes. Computing them here would run torch's meta kernels, whose first use imports
            # torch._dynamo - seconds of start-up in every worker process.
            shape = (max_positions, spec.head_dim // 2)
            self.register_buffer("cos", torch.empty(shape), persistent=False)
            self.register_buffer("sin", torch.empty(shape), persistent=False)
        else:
            inv_freq = rope_inv_freq(spec)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)  # [max_positions, head_dim / 2]
            self.register_buffer("cos", freqs.cos(), persistent=False)
            self.register_buffer("sin", freqs.sin(), persistent=False)
        self._step_positions: torch.Tensor | None = None
        self._step_cos = self._step_sin = None

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [num_tokens, num_heads, head_dim]; rotate-half layout as in Hugging Face checkpoints.
        if (ops := _layer_ops(q)) is not None:
            ops.rotary_embedding_(q, k, positions, self.cos, self.sin)
            return q, k
        if self._step_positions is not positions:
            # Gathered once per forward pass and reused by every layer (they all get the same positions tensor).
            self._step_positions = positions
            self._step_cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim / 2]
            self._step_sin = self.sin[positions].unsqueeze(1)
        # q and k rotated together: one pass over [num_tokens, num_heads + num_kv_heads, head_dim].
        num_heads = q.shape[1]
        qk = _rotate(torch.cat((q, k), dim=1), self._step_cos, self._step_sin)
        return qk[:, :num_heads], qk[:, num_heads:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


def _column(ranges: list[tuple[int, int]], tp: int, in_features: int) -> TensorParallelShard | None:
    return TensorParallelShard("column", tuple(ranges), tp, in_features) if tp > 1 else None


def _row(start: int, size: int, tp: int, in_features: int) -> TensorParallelShard | None:
    return TensorParallelShard("row", ((start, size),), tp, in_features) if tp > 1 else None


class Attention(nn.Module):
    """Self-attention over one tensor-parallel rank's heads: num_heads / tp query heads and num_kv_heads / tp
    KV heads (column-parallel q/k/v), or, when tp exceeds the KV heads, the one KV head its query heads read
    (rank r: head r * num_kv_heads // tp, replicated on tp / num_kv_heads ranks); o_proj row-parallel."""

    def __init__(self, spec: DecoderSpec, backend: AttentionBackend, quant_config: QuantizationConfig,
                 dtype: torch.dtype | None, prefix: str) -> None:
        super().__init__()
        tp_group = get_tp_group()
        tp, rank = tp_group.world_size, tp_group.rank_in_group
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = max(1, spec.num_kv_heads // tp)
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * spec.head_dim
        self.kv_size = self.num_kv_heads * spec.head_dim
        kv_start = rank * spec.num_kv_heads // tp * spec.head_dim
        # q, k and v projections fused into one matmul.
        shards = [f"{prefix}.{p}_proj" for p in "qkv"]
        self.qkv_proj = Linear(spec.hidden_size, self.q_size + 2 * self.kv_size, spec.qkv_bias,
                               quant_config.get_linear_method(f"{prefix}.qkv_proj", shards),
                               [self.q_size, self.kv_size, self.kv_size], dtype, f"{prefix}.qkv_proj",
                               _column([(rank * self.q_size, self.q_size), (kv_start, self.kv_size),
                                        (kv_start, self.kv_size)], tp, spec.hidden_size))
        self.o_proj = Linear(self.q_size, spec.hidden_size, spec.o_bias,
                             quant_config.get_linear_method(f"{prefix}.o_proj", [f"{prefix}.o_proj"]),
                             dtype=dtype, prefix=f"{prefix}.o_proj",
                             tp_shard=_row(rank * self.q_size, self.q_size, tp, spec.num_heads * spec.head_dim))
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        o = self.backend.forward(q, k, v, kv_cache, meta)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(-1, self.q_size))


class MLP(nn.Module):
    """Gated MLP over one tensor-parallel rank's slice of the intermediate size (gate/up column-parallel,
    down_proj row-parallel)."""

    def __init__(self, spec: DecoderSpec, quant_config: QuantizationConfig, dtype: torch.dtype | None,
                 prefix: str) -> None:
        super().__init__()
        tp_group = get_tp_group()
        tp, rank = tp_group.world_size, tp_group.rank_in_group
        inter = spec.intermediate_size // tp
        # gate and up projections fused into one matmul.
        shards = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = Linear(spec.hidden_size, 2 * inter, False,
                                   quant_config.get_linear_method(f"{prefix}.gate_up_proj", shards),
                                   [inter, inter], dtype, f"{prefix}.gate_up_proj",
                                   _column([(rank * inter, inter)] * 2, tp, spec.hidden_size))
        self.down_proj = Linear(inter, spec.hidden_size, False,
                                quant_config.get_linear_method(f"{prefix}.down_proj", [f"{prefix}.down_proj"]),
                                dtype=dtype, prefix=f"{prefix}.down_proj",
                                tp_shard=_row(rank * inter, inter, tp, spec.intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (ops := _layer_ops(gate_up)) is not None:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, backend: AttentionBackend, quant_config: QuantizationConfig,
                 dtype: torch.dtype | None, prefix: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, backend, quant_config, dtype, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp = MLP(spec, quant_config, dtype, f"{prefix}.mlp")

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before it): the caller's next norm adds the two, as vLLM's layers do,
        so every residual add is fused into the RMSNorm after it."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rotary, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


def _backends_by_window(spec: DecoderSpec, backend: AttentionBackend) -> dict[int | None, AttentionBackend]:
    """window -> the attention backend of the layers with that window: `backend` for its own window, a copy
    with the other window for the rest (Qwen2 windows only the layers from max_window_layers on, Gemma-style
    models alternate)."""
    backends = {backend.sliding_window: backend}
    for layer in range(spec.num_layers):
        window = spec.layer_sliding_window(layer)
        if window not in backends:
            other = copy.copy(backend)
            other.sliding_window = window
            backends[window] = other
    return backends


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: the hidden states after its last layer and the residual stream
    beside them (each [num_tokens, hidden_size]; the next stage's first norm adds the two, as the layers do)."""

    hidden_states: torch.Tensor
    residual: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.hidden_states, self.residual]


class PPMissingLayer(nn.Module):
    """The place of a module another pipeline stage holds: no parameters, no memory, never called. It keeps the
    layer indices global (model.layers[i] is decoder layer i on every stage)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


class LlamaForCausalLM(nn.Module):
    """quant_config decides how every linear layer (and the embedding table) stores its weight; dtype is the
    activation dtype the weights are created for (default: torch's default dtype).

    Pipeline parallelism: a stage builds only what it runs (planner.pipeline_stage_layers decides the split):
    its decoder layers [start_layer, end_layer), the embedding on the first stage, the final norm and the lm_head
    on the last (with tied embeddings the last stage holds the embedding table, as its lm_head). Everything else
    is a PPMissingLayer, and the loader skips its checkpoint tensors."""

    tp_size = 1  # devices the layers are sharded over (tensor parallel); the fused decode step runs only unsharded

    def __init__(self, spec: DecoderSpec, backend: AttentionBackend, max_positions: int,
                 quant_config: QuantizationConfig | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.quant_config = quant_config or UnquantizedConfig()
        q = self.quant_config
        pp_group = get_pp_group()
        self.pp_size, self.pp_rank = pp_group.world_size, pp_group.rank_in_group
        self.is_first_stage, self.is_last_stage = pp_group.is_first_rank, pp_group.is_last_rank
        self.start_layer, self.end_layer = pipeline_stage_layers(spec.num_layers, self.pp_size)[self.pp_rank]
        # Tensor parallelism: each rank holds a slice of the vocabulary (padded to a multiple of the ranks) for
        # the embedding and the lm_head; compute_logits gathers the slices on tp rank 0, which samples.
        tp_group = get_tp_group()
        tp, rank = tp_group.world_size, tp_group.rank_in_group
        self.tp_size = tp
        vocab_per_rank = -(-spec.vocab_size // tp)
        vocab_shard = _column([(rank * vocab_per_rank, vocab_per_rank)], tp, spec.hidden_size)
        embedding = None
        if self.is_first_stage or (self.is_last_stage and spec.tie_word_embeddings):
            embedding = VocabEmbedding(vocab_per_rank, spec.hidden_size,
                                       q.get_linear_method("model.embed_tokens", ["model.embed_tokens"]), dtype,
                                       "model.embed_tokens", vocab_shard)
        self.embed_tokens: nn.Module = embedding if embedding is not None else PPMissingLayer()
        backends = _backends_by_window(spec, backend)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, backends[spec.layer_sliding_window(i)], q, dtype, f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(spec.num_layers)
        )
        self.norm: nn.Module
        self.lm_head: nn.Module
        if not self.is_last_stage:
            self.norm = PPMissingLayer()
            self.lm_head = PPMissingLayer()
        else:
            self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
            if embedding is not None and spec.tie_word_embeddings:
                self.lm_head = TiedLMHead(embedding)
            else:
                self.lm_head = Linear(spec.hidden_size, vocab_per_rank, False,
                                      q.get_linear_method("lm_head", ["lm_head"]), dtype=dtype, prefix="lm_head",
                                      tp_shard=vocab_shard)
        self.rotary = RotaryEmbedding(spec, max_positions)
        # Decode-only steps of a few rows as one native call (kernels/cpu/decode.py), prepared once the weights
        # are packed; never with sharded layers, whose all-reduces the fused step does not do.
        self.fused_decoder: FusedDecoder | None = None

    @property
    def num_stage_layers(self) -> int:
        """Decoder layers this pipeline stage runs (all of them without pipeline parallelism); one KV cache
        tensor each."""
        return self.end_layer - self.start_layer

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        intermediate_tensors: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """Final hidden states [num_tokens, hidden_size] for the flat batch input_ids [num_tokens].

        Pipeline stages: the first embeds input_ids, the others start from the previous stage's
        intermediate_tensors (input_ids unused); every stage but the last returns IntermediateTensors for the
        next. kv_caches holds the stage's layers only."""
        if self.fused_decoder is not None and intermediate_tensors is None:  # only built for a whole model
            fused = self.fused_decoder.forward(input_ids, positions, kv_caches, meta)
            if fused is not None:
                return fused
        if self.is_first_stage:
            x, residual = self.embed_tokens(input_ids), None
        else:
            if intermediate_tensors is None:
                raise ValueError(f"pipeline stage {self.pp_rank} needs the previous stage's intermediate_tensors")
            x, residual = intermediate_tensors.hidden_states, intermediate_tensors.residual
        layers = self.layers
        for i, kv_cache in zip(range(self.start_layer, self.end_layer), kv_caches, strict=True):
            x, residual = layers[i](x, residual, positions, self.rotary, kv_cache, meta)
        if not self.is_last_stage:
            assert residual is not None  # every stage runs at least one layer
            return IntermediateTensors(x, residual)
        return self.norm(x, residual)[0]

    def empty_intermediate_tensors(self, num_tokens: int, device: torch.device) -> IntermediateTensors:
        """Uninitialised buffers for num_tokens tokens of what the previous stage sends (to receive into)."""
        shape = (num_tokens, self.spec.hidden_size)
        return IntermediateTensors(torch.empty(shape, dtype=self.dtype, device=device),
                                   torch.empty(shape, dtype=self.dtype, device=device))

    def num_weight_elements(self) -> int:
        """Elements of the model's weights as the checkpoint defines them (tied embeddings once), whatever
        layout their quantization method keeps them in."""
        total = 0
        for module in self.modules():
            if isinstance(module, Linear):
                total += module.in_features * module.out_features + (module.out_features if module.bias is not None
                                                                      else 0)
            elif isinstance(module, RMSNorm):
                total += module.weight.numel()
        return total

    def weight_bytes(self) -> int:
        """Bytes the model's weights occupy in memory, as allocated: parameters, buffers and the kernels'
        packed tensors (each storage once), rotary tables excluded (they belong to max_model_len, not weights)."""
        from tokenmill.model.layers.linear import resident_tensors, tensor_bytes

        seen: dict[int, int] = {}
        for module in self.modules():
            if module is self.rotary:
                continue
            for t in resident_tensors(module):
                if t.device.type != "meta":
                    key, nbytes = tensor_bytes(t)
                    seen[key] = nbytes
        return sum(seen.values())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [rows, vocab] in the model's dtype (the sampler converts to float32 where it needs to). With
        tensor parallelism every rank computes its vocabulary slice and tp rank 0 gets them all (the padding cut
        off, never sampled); the other ranks get None. Only the last pipeline stage has an lm_head."""
        if not self.is_last_stage:
            raise RuntimeError(f"pipeline stage {self.pp_rank} has no lm_head: the last stage computes logits")
        if self.fused_decoder is not None:  # a fused decode step may have computed them already
            fused = self.fused_decoder.take_logits(hidden)
            if fused is not None:
                return fused
        logits = self.lm_head(hidden)
        if self.tp_size == 1:
            return logits
        gathered = tensor_model_parallel_gather(logits, dst=0, dim=-1)
        if gathered is None:
            return None
        vocab = self.spec.vocab_size
        return gathered if gathered.shape[-1] == vocab else gathered[..., :vocab]

    # ---- weights ------------------------------------------------------------------------------------------
    # Hugging Face projection -> (our fused layer, shard index)
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def holds_weight(self, hf_name: str) -> bool:
        """Whether this pipeline stage holds the checkpoint tensor hf_name ("model.layers.3.mlp.up_proj.weight"):
        its own layers' tensors, the embedding on the first stage (and on the last with tied embeddings), the
        final norm and lm_head on the last. Always true without pipeline parallelism."""
        if self.pp_size == 1:
            return True
        name = hf_name.removeprefix("model.")
        head, _, rest = name.partition(".")
        if head == "layers":
            index = rest.partition(".")[0]
            return not index.isdigit() or self.start_layer <= int(index) < self.end_layer
        if head == "embed_tokens":
            return not isinstance(self.embed_tokens, PPMissingLayer)
        if head in ("norm", "lm_head"):
            return self.is_last_stage
        return True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stream Hugging Face-named tensors into the model: each into its layer's parameter (one shard of a
        fused layer) through the parameter's weight_loader; returns the checkpoint names filled (without
        "model."). Tensors of other pipeline stages are skipped (holds_weight). Then every layer repacks its
        weights for its kernel (process_weights_after_loading)."""
        spec = self.spec
        modules = dict(self.named_modules())
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or not self.holds_weight(hf_name):
                continue
            if name.startswith("lm_head.") and spec.tie_word_embeddings:
                continue
            module_name, _, param_name = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            shard_id = None
            if leaf in self._FUSED:
                leaf, shard_id = self._FUSED[leaf]
                module_name = f"{parent}.{leaf}"
            module = modules.get(module_name)
            try:
                if isinstance(module, Linear):
                    module.load_weight(param_name, tensor, shard_id)
                else:
                    param = params.get(name)
                    if param is None:
                        raise ValueError(f"has no place in a {spec.model_type} model")
                    if tuple(param.shape) != tuple(tensor.shape):
                        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                    param.data.copy_(tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {hf_name!r} {e}") from None
            loaded.add(name)
        return loaded

    def process_weights_after_loading(self) -> None:
        """Repack every layer's loaded weights into its kernel's layout (once, after loading)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.process_weights_after_loading()
        self.fused_decoder = FusedDecoder.build(self, self.tp_size)

    def expected_weight_names(self) -> set[str]:
        """Checkpoint tensor names (without the "model." prefix) a complete checkpoint provides: the norms, and
        every parameter of every layer's quantization method, for each of a fused layer's parts."""
        names = set()
        reverse = {}  # (fused layer, shard) -> Hugging Face projection
        for hf_leaf, (leaf, shard) in self._FUSED.items():
            reverse[(leaf, shard)] = hf_leaf
        for module_name, module in self.named_modules():
            if isinstance(module, TiedLMHead):
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                if module.__dict__.get("param_attrs", {}).get(param_name, {}).get("optional"):
                    continue  # a tensor checkpoints may leave out, e.g. GPTQ's g_idx without act-order
                if isinstance(module, Linear) and len(module.output_sizes) > 1:
                    parent, _, leaf = module_name.rpartition(".")
                    for shard in range(len(module.output_sizes)):
                        names.add(f"{parent}.{reverse[(leaf, shard)]}.{param_name}")
                else:
                    names.add(f"{module_name}.{param_name}")
        return names
