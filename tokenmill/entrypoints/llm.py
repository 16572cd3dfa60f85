"""The offline API, named as vLLM's: LLM(...).generate(prompts, sampling_params) and LLM.chat(messages)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.engine.core_client import multiprocess_from_env
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import EmbeddingRequestOutput, RequestOutput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams

PromptType = str | dict | list[int]


class LLM:
    """An engine for offline batched generation.

    model: a Hugging Face model directory, a .gguf file, a hub id ("org/name", with revision= and download_dir=;
    downloaded into the HF cache unless HF_HUB_OFFLINE=1), or None for the bundled SmolLM2-135M-Instruct.
    batch_invariant: kernels whose results do not depend on the batch, so greedy and seeded outputs are the same
    whatever else runs (CPU; slower). None reads the TOKENMILL_BATCH_INVARIANT environment variable.
    quantization: vLLM's --quantization. None runs the checkpoint's own format (a GGUF stays quantized); "int8" or
    "int4" quantize a full-precision checkpoint at load; a name that contradicts the checkpoint is an error.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        show_progress: bool = True,
        multiprocess: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """kwargs: the engine arguments (tokenmill.engine.arg_utils.EngineArgs: dtype, max_model_len,
        max_num_seqs, kv_cache_memory, ... the same names as the `serve` flags). multiprocess: run the engine core
        in a child process (default: the TOKENMILL_ENGINE_MULTIPROCESS environment variable, else in this one)."""
        config = EngineArgs.from_kwargs(model, **kwargs).create_engine_config()
        if multiprocess is None:
            multiprocess = multiprocess_from_env()
        self.llm_engine = LLMEngine(config, show_progress=show_progress, multiprocess=multiprocess)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given; all prompts are batched together. A request whose
        grammar (structured_outputs) cannot be compiled, or not within the compile timeout, raises
        StructuredOutputError (a ValueError) and the call's other requests are aborted."""
        prompts = self._prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompts))
        return self._run(self._add_all(prompts, params_list, self.llm_engine.add_request), use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt, in the order given (vLLM's LLM.embed): the prompt's final normed hidden
        states pooled as pooling_type says (the engine's --pooling-type by default) and L2-normalized."""
        prompts = self._prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} pooling_params for {len(prompts)} prompts: pass one, "
                                 "or one per prompt")
        return self._run(self._add_all(prompts, params_list, self.llm_engine.add_pooling_request), use_tqdm)

    def _add_all(self, prompts: list[PromptType], params_list: list, add: Callable[..., object]) -> list[str]:
        """Tokenize the prompts and add one engine request per prompt (all with the same arrival time) through
        `add` (add_request or add_pooling_request); their request ids, in order."""
        tokenized = self._tokenize_all(prompts)
        request_ids = []
        now = time.time()
        for prompt, params in zip(tokenized, params_list, strict=True):
            request_id = self.llm_engine.next_request_id()
            add(request_id, prompt, params, arrival_time=now)
            request_ids.append(request_id)
        return request_ids

    def _prompt_list(self, prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            return [cast(PromptType, prompts)]
        return list(cast(Sequence[PromptType], prompts))

    def _tokenize_all(self, prompts: list[PromptType]) -> list[dict]:
        """Every prompt tokenized and validated before any is queued, so one bad prompt leaves nothing
        half-submitted."""
        engine = self.llm_engine
        tokenized = []
        for prompt in prompts:
            text, ids = engine.tokenize_prompt(prompt)
            engine.validate_prompt(ids)
            tokenized.append({"prompt": text, "prompt_token_ids": ids})
        return tokenized

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, rendered with the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a list of such lists)")
        conversations = messages if isinstance(messages[0], list) else [messages]
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            # The template writes the special tokens itself.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _params_list(sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        params = list(sampling_params)
        if len(params) != num_prompts:
            raise ValueError(
                f"got {len(params)} sampling_params for {num_prompts} prompts: pass one, or one per prompt"
            )
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[Any]:
        """The finished outputs (RequestOutput, or EmbeddingRequestOutput for pooling) in request order."""
        engine = self.llm_engine
        wanted = set(request_ids)
        finished: dict[str, Any] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", unit="req", disable=not use_tqdm)
        num_output_tokens = 0
        start = time.perf_counter()
        try:
            while len(finished) < len(wanted):
                outputs = engine.step(final_only=True)
                failed = [e for r, e in engine.take_errors().items() if r in wanted]
                if failed:
                    raise failed[0]  # e.g. a grammar that did not compile (StructuredOutputError, a ValueError)
                for output in outputs:
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        if isinstance(output, RequestOutput):
                            num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"{num_output_tokens / (time.perf_counter() - start):.1f} output tok/s")
        except BaseException:
            engine.abort_request([r for r in request_ids if r not in finished])
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]
