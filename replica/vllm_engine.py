"""vLLM's `AsyncLLM` behind the replica's `Engine` interface.

Assumes the process environment was set by the entry point
(`replica.main.run`) before vLLM is imported: vLLM reads some CPU settings
only from the environment. Settings that vLLM accepts as arguments are passed
as arguments, from the deployment's `engine_args`. vLLM and transformers are
imported only when the engine starts, so creating one is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from mss.config import Deployment
from replica.engine import Delta, Engine, EngineLoad, Messages, Prepared

log = logging.getLogger(__name__)

GIB = 1 << 30


class VllmEngine(Engine):
    """vLLM's AsyncLLM with a model folder resolved by `replica.model_store`."""

    def __init__(self, deployment: Deployment) -> None:
        super().__init__(deployment)
        self._stats = EngineLoad()
        self._llm: Any = None
        self._tokenizer: Any = None

    async def start(self) -> None:
        from replica.model_store import resolve_model

        args = self.deployment.engine_args
        path = await asyncio.to_thread(resolve_model, self.deployment.model)
        log.info("loading %s from %s (dtype %s)", self.model_name, path, args.dtype)
        started = time.monotonic()
        self._llm = await asyncio.to_thread(self._build, str(path))
        self._tokenizer = await asyncio.to_thread(self._load_tokenizer, str(path))
        log.info("engine ready in %.1f s", time.monotonic() - started)

    def _build(self, path: str) -> Any:
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
        )
        return AsyncLLM.from_engine_args(engine_args, stat_loggers=[self._stat_logger_factory()])

    @property
    def llm(self) -> Any:
        """The underlying AsyncLLM once started (benchmarks call it directly)."""
        return self._llm

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def load(self) -> EngineLoad:
        """The scheduler's last numbers; zero when the engine holds no request.

        Stats arrive only with engine steps, so after an abort with nothing else
        running the last recorded numbers would go stale; the request count of
        the engine's own front end is exact.
        """
        if self._llm is None or self._llm.get_num_unfinished_requests() == 0:
            return EngineLoad(0, 0, self._stats.kv_cache_usage)
        return self._stats

    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def _stat_logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        load = self._stats

        class LoadRecorder(StatLoggerBase):
            """Keeps the engine's latest scheduler numbers for routing."""

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

            def log_engine_initialized(self) -> None:
                pass

        return LoadRecorder

    def _tokenize(self, messages: Messages, prompt: str) -> tuple[str, list[int]]:
        if messages:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            # The rendered template already holds the model's special tokens.
            return text, list(self._tokenizer.encode(text, add_special_tokens=False))
        return prompt, (list(self._tokenizer.encode(prompt)) if prompt else [])

    async def _stream(self, prepared: Prepared) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params: dict[str, Any] = {
            "max_tokens": prepared.max_tokens,
            "output_kind": RequestOutputKind.DELTA,
            "stop": prepared.stop or None,
            "seed": prepared.seed,
            "ignore_eos": prepared.ignore_eos,
        }
        if prepared.temperature is not None:
            params["temperature"] = prepared.temperature
        if prepared.top_p is not None:
            params["top_p"] = prepared.top_p
        prompt = {"prompt_token_ids": prepared.prompt_token_ids}
        produced = 0
        async for out in self._llm.generate(
            prompt, SamplingParams(**params), request_id=prepared.request_id
        ):
            completion = out.outputs[0]
            produced += len(completion.token_ids)
            delta = Delta(text=completion.text, num_tokens=len(completion.token_ids))
            if out.finished:
                delta.finish_reason = completion.finish_reason or "stop"
                delta.prompt_tokens = len(prepared.prompt_token_ids)
                delta.completion_tokens = produced
            yield delta

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
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ calls shutdown() again; run at interpreter exit,
            # with modules half torn down, it prints a traceback. It is done.
            llm.shutdown = lambda timeout=None: None
        await super().shutdown()
