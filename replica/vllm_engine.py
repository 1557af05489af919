"""vLLM's `AsyncLLM` behind the replica's `Engine` interface.

Assumes the process environment was set by the entry point
(`replica.main.run`) before vLLM is imported: vLLM reads some CPU settings
only from the environment. Settings that vLLM accepts as arguments are passed
as arguments, from the deployment's `engine_args`. vLLM and transformers are
imported only when the engine starts, so creating one is cheap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from mss.config import Deployment
from protos import replica_pb2
from replica.engine import (
    Delta,
    Engine,
    EngineLoad,
    InvalidRequest,
    PrefixCacheWindow,
    Prepared,
    PromptSource,
)
from replica.sampling import Limits, Sampling

log = logging.getLogger(__name__)

GIB = 1 << 30
CORE_CHECK_INTERVAL_S = 0.5


class VllmEngine(Engine):
    """vLLM's AsyncLLM with a model folder resolved by `replica.model_store`."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(deployment)
        self._stats = EngineLoad()
        self._llm: Any = None
        self._tokenizer: Any = None
        self._limits = Limits(vocab_size=0, max_model_len=self.max_model_len)
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from replica.model_store import resolve_model

        args = self.deployment.engine_args
        path = await asyncio.to_thread(resolve_model, self.deployment.model)
        log.info("loading %s from %s (dtype %s)", self.model_name, path, args.dtype)
        started = time.monotonic()
        self._llm = await asyncio.to_thread(self._build, str(path))
        self._log_prefix_caching()
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer, str(path))
        model_config = self._llm.model_config
        self._limits = Limits(
            vocab_size=model_config.get_vocab_size(),
            max_model_len=model_config.max_model_len,
            max_logprobs=(
                model_config.max_logprobs
                if model_config.max_logprobs >= 0
                else model_config.get_vocab_size()
            ),
            max_n=args.max_num_seqs,
        )
        log.info("engine ready in %.1f s", time.monotonic() - started)
        self._watcher = asyncio.create_task(self._watch_core(), name="engine-core-watch")

    async def _watch_core(self) -> None:
        """Notice the engine core dying while no request runs (a request notices at once)."""
        while self._llm is not None and not self.dead.is_set():
            if self._llm.errored:
                self.died(f"engine core stopped: {self._llm.dead_error}")
                return
            await asyncio.sleep(CORE_CHECK_INTERVAL_S)

    def _build(self, path: str) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self.deployment.engine_args
        # On CPU the KV cache has a fixed size (what VLLM_CPU_KVCACHE_SPACE
        # sets); on a GPU it is what gpu_memory_utilization leaves.
        kv_cache_bytes = int(args.kv_cache_gib * GIB) if current_platform.is_cpu() else None
        engine_args = AsyncEngineArgs(
            model=path,
            served_model_name=self.model_name,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
            gpu_memory_utilization=args.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes,
            seed=args.seed,
            enable_prefix_caching=args.enable_prefix_caching,
            # vLLM's server default, measured on vllm-cpu 0.32: "auto" takes
            # xgrammar (which constrains JSON schemas, regexes, choices and
            # JSON objects on CPU) and falls back to guidance (works on CPU
            # too) for what xgrammar cannot compile; both refuse a bad schema
            # or regex in `SamplingParams.verify`, before generation.
            structured_outputs_config=StructuredOutputsConfig(backend="auto"),
        )
        return AsyncLLM.from_engine_args(engine_args, stat_loggers=[self._stat_logger_factory()])

    def _log_prefix_caching(self) -> None:
        """Say whether the built engine caches prompt prefixes: vLLM's CPU platform turns
        caching off for models it cannot do it for (MLA attention, RISC-V CPUs)."""
        cache = self._llm.vllm_config.cache_config
        asked = self.deployment.engine_args.enable_prefix_caching
        if cache.enable_prefix_caching:
            log.info("prefix caching on (blocks of %d tokens)", cache.block_size)
        elif asked:
            log.warning(
                "prefix caching asked for but off: vLLM turned it off for this model or "
                "platform (MLA attention or a RISC-V CPU on CPU; vLLM's log above says why)"
            )
        else:
            log.info("prefix caching off (engine_args.enable_prefix_caching is false)")

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM once started (benchmarks call it directly)."""
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def load(self) -> EngineLoad:
        """The scheduler's last numbers; zero when the engine holds no request.

        Stats arrive only with engine steps, so after an abort with nothing else
        running the last recorded numbers would go stale; the request count of
        the engine's own front end is exact. The prefix-cache numbers are kept.
        """
        if self._llm is None or self._llm.get_num_unfinished_requests() == 0:
            return dataclasses.replace(self._stats, running=0, waiting=0)
        return self._stats

    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def _stat_logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self._stats
        window = PrefixCacheWindow()

        class LoadRecorder(StatLoggerBase):
            """Keeps the engine's latest scheduler numbers for routing, and adds up its
            prefix-cache lookups (each step reports only its newly scheduled requests)."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    load.running = scheduler_stats.num_running_reqs
                    load.waiting = scheduler_stats.num_waiting_reqs
                    load.kv_cache_usage = scheduler_stats.kv_cache_usage
                    prefix = scheduler_stats.prefix_cache_stats
                    if prefix is not None:
                        if prefix.reset:
                            window.clear()
                        window.observe(prefix.requests, prefix.queries, prefix.hits)
                        load.prefix_cache_queries += prefix.queries
                        load.prefix_cache_hits += prefix.hits
                        load.prefix_cache_hit_rate = window.hit_rate

            def log_engine_initialized(self) -> None:
                pass

        return LoadRecorder

    # ----- rendering and tokenizing (on the tokenizer thread) ----------------------------

    def _tokenize(self, source: PromptSource) -> tuple[str, list[int]]:
        if source.prompt_token_ids:
            return self._tokenizer.decode(source.prompt_token_ids), source.prompt_token_ids
        if source.messages:
            text = self._render_chat(source)
            # The rendered template already holds the model's special tokens.
            add_special = bool(source.add_special_tokens)
        else:
            text = source.prompt
            add_special = source.add_special_tokens is not False
        if not text:
            return text, []
        return text, list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def _render_chat(self, source: PromptSource) -> str:
        """The chat template applied as vLLM's OpenAI server applies it.

        The server's path (`OnlineRenderer.preprocess_chat`) hands the
        engine's renderer the request's messages and
        `{"tools": ..., "tokenize": False}` overlaid by the request's
        template kwargs; the renderer parses the messages (content-format
        detection, `tool_calls` arguments parsed to objects, `developer` to
        `system` where the template lacks it), keeps only the kwargs the
        template uses and applies it. Calling that same renderer keeps the
        prompt, and so greedy text, identical to the server's.
        """
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.params import ChatParams

        defaults: dict[str, Any] = {"tokenize": False}
        if source.tools is not None:
            defaults["tools"] = source.tools
        params = ChatParams(chat_template_kwargs=defaults | source.template_kwargs)
        try:
            _, prompt = self._llm.renderer.render_messages(source.messages, params)
        except (VLLMClientError, ValueError, TypeError, KeyError) as exc:
            # The template or the message parser refused the conversation
            # (vLLM answers these with 400 too).
            raise InvalidRequest(f"messages: {_message(exc)}") from None
        return str(prompt["prompt"])

    def _token_strs(self, ids: list[int]) -> list[str]:
        return list(self._tokenizer.convert_ids_to_tokens(ids))

    def _detokenize(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))

    def _output_text(self, ids: list[int], sampling: Sampling) -> str:
        return str(
            self._tokenizer.decode(
                ids,
                skip_special_tokens=sampling.skip_special_tokens,
                spaces_between_special_tokens=sampling.spaces_between_special_tokens,
            )
        )

    def _engine_params(self, prepared: Prepared) -> Any:
        """vLLM's SamplingParams, checked as vLLM's input processor checks them.

        `SamplingParams.verify` is what `AsyncLLM.generate` runs on every
        request: vocabulary and logprob bounds, and the structured-output
        backend's own validation of the schema, regex or grammar (it compiles
        them). Run here, a refusal is an INVALID_ARGUMENT before the request
        is admitted, not a failure after its stream has started.
        """
        from vllm.exceptions import VLLMClientError

        sampling = prepared.sampling
        try:
            params = sampling.for_vllm()
            params.verify(
                self._llm.model_config,
                self._llm.vllm_config.speculative_config,
                self._llm.vllm_config.structured_outputs_config,
                self._llm.tokenizer,
            )
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidRequest(f"{_field(exc, sampling)}: {_message(exc)}") from None
        return params

    # ----- streaming ---------------------------------------------------------------------

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        """vLLM's outputs as deltas, one per choice per step.

        With DELTA outputs each `RequestOutput` holds the new tokens of the
        choices that advanced (`CompletionOutput.index`; a parent request
        with n > 1 reports one child per output, and outputs that queued up
        while this consumer was busy arrive merged, one entry per choice).
        `finish_reason` is set on a choice's last output and
        `RequestOutput.finished` once every choice is done. Prompt logprobs
        come with a child's first output; they are sent with choice 0's first
        delta, as the wire contract says.
        """
        sampling = prepared.sampling
        want_logprobs = sampling.logprobs is not None
        want_prompt_logprobs = sampling.prompt_logprobs is not None
        pending_prompt: list[int] | None = prepared.prompt_token_ids
        prompt_logprobs: list[replica_pb2.TokenLogprob] | None = None
        produced = 0
        # The engine's renderer turns the token prompt into the engine's input, as
        # vLLM's own server does; AsyncLLM would do the same for a raw prompt, with a
        # warning that it will stop taking them.
        (engine_input,) = self._llm.renderer.render_cmpl(
            [{"prompt_token_ids": prepared.prompt_token_ids}]
        )
        outputs = self._llm.generate(
            engine_input, prepared.engine_params, request_id=prepared.request_id
        )
        try:
            async for out in outputs:
                if want_prompt_logprobs and out.prompt_logprobs and not prompt_logprobs:
                    prompt_logprobs = self._prompt_logprobs(
                        prepared.prompt_token_ids, out.prompt_logprobs
                    )
                delta = None
                for completion in out.outputs:
                    token_ids = completion.token_ids
                    produced += len(token_ids)
                    delta = Delta(
                        text=completion.text,
                        num_tokens=len(token_ids),
                        index=completion.index,
                        token_ids=token_ids,
                    )
                    if want_logprobs and completion.logprobs is not None:
                        delta.logprobs = self._logprobs(token_ids, completion.logprobs)
                    if pending_prompt is not None and completion.index == 0:
                        delta.prompt_token_ids, pending_prompt = pending_prompt, None
                        delta.prompt_logprobs = prompt_logprobs
                    if completion.finish_reason is not None:
                        delta.finish_reason = completion.finish_reason
                        if completion.stop_reason is not None:
                            delta.stop_reason = str(completion.stop_reason)
                    if out.finished and completion is out.outputs[-1]:
                        delta.last = True
                        delta.finish_reason = delta.finish_reason or "stop"
                        delta.prompt_tokens = len(prepared.prompt_token_ids)
                        delta.completion_tokens = produced
                    yield delta
                if out.finished and delta is None:
                    # Finished with nothing new (every choice had already reported).
                    yield Delta(
                        text="",
                        num_tokens=0,
                        last=True,
                        finish_reason="stop",
                        prompt_tokens=len(prepared.prompt_token_ids),
                        completion_tokens=produced,
                    )
        except Exception as exc:
            # Once the engine core is gone every request fails the same way: say so
            # once, and let the replica stop so its scheduler restarts it.
            if self._llm.errored:
                raise self.died(f"{type(exc).__name__}: {exc}") from exc
            raise

    def _logprobs(self, token_ids: Sequence[int], steps: Any) -> list[replica_pb2.TokenLogprob]:
        """One entry per token: its logprob and the engine's alternatives in vLLM's order
        (the chosen token first, then the most likely by rank), token text as vLLM
        decoded it for its server (`Logprob.decoded_token`)."""
        out = []
        for position, token_id in enumerate(token_ids):
            step = steps[position] if position < len(steps) else None
            out.append(self._token_logprob(token_id, step))
        return out

    def _prompt_logprobs(self, prompt_ids: list[int], steps: Any) -> list[replica_pb2.TokenLogprob]:
        return [
            self._token_logprob(token_id, steps[i] if i < len(steps) else None)
            for i, token_id in enumerate(prompt_ids)
        ]

    def _token_logprob(self, token_id: int, step: Any) -> replica_pb2.TokenLogprob:
        entry = replica_pb2.TokenLogprob(token_id=token_id)
        chosen = step.get(token_id) if step is not None else None
        if chosen is None:
            # No logprob here (the prompt's first token): the token as the server decodes it.
            entry.token = self._tokenizer.decode([token_id])
            return entry
        entry.token = self._decoded(token_id, chosen)
        entry.logprob = chosen.logprob
        entry.rank = chosen.rank or 0
        entry.has_logprob = True
        add = entry.top.add
        for alt_id, alt in step.items():
            add(
                token_id=alt_id,
                token=self._decoded(alt_id, alt),
                logprob=alt.logprob,
                rank=alt.rank or 0,
            )
        return entry

    def _decoded(self, token_id: int, logprob: Any) -> str:
        text = logprob.decoded_token
        return str(text) if text is not None else str(self._tokenizer.decode([token_id]))

    async def abort(self, request_id: str) -> None:
        """Abort in vLLM's front end and engine core.

        vLLM's own `generate` also aborts as it unwinds from a cancellation;
        an abort of an id vLLM no longer holds does nothing, so the second
        one is harmless and this path does not depend on vLLM's.
        """
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def running_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests()) if self._llm else 0

    async def shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again; run at interpreter exit,
            # with modules half torn down, it prints a traceback. It is done.
            llm.shutdown = lambda timeout=None: None
        await super().shutdown()


def _message(exc: BaseException) -> str:
    """The error's own sentence, without vLLM's "(parameter=..., value=...)" suffix."""
    return str(exc.args[0]) if exc.args else type(exc).__name__


def _field(exc: BaseException, sampling: Sampling) -> str:
    """The OpenAI name of the field vLLM refused."""
    parameter = getattr(exc, "parameter", None)
    if parameter == "logprobs":
        return "logprobs"  # the completions API's name; chat requests are checked earlier
    if parameter:
        return str(parameter)
    if sampling.structured is not None:
        return sampling.structured.field_name
    return "sampling"
