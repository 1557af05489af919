"""The gateway object: what one gateway process serves from, and where every request is decided.

`Gateway` holds the routing table, the generation service and the settings,
starts and stops their background tasks, and answers every generation request
in one place, `serve`, in one direction:

1. read it (`gateway.request_reader`): API key, content type, body size, the
   route's parser;
2. route it: the model's `ModelRouter` and the max_tokens bound;
3. hold it while an autoscaled model has no ready replica (`gateway.cold_start`);
4. hand it to `GenerationService.run`, which admits it and streams it.

Every refusal, from any step (or from the replicas before the first byte), is
answered and counted in `serve`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from gateway import metrics, tokenize_api
from gateway.admission import ClientLimiter
from gateway.api_keys import KeyStore
from gateway.api_models import check_max_tokens
from gateway.cold_start import ColdStarts, Hold, HoldAbandoned
from gateway.errors import ApiError, quote, send_error
from gateway.generation import GenerationRequest, GenerationService
from gateway.rate_limits import KeyLimiter
from gateway.replica_client import ReplicaClient
from gateway.request_reader import (
    SEED_ROUTE,
    make_format,
    parse_body,
    read_body,
    request_headers,
)
from gateway.response_cache import ResponseCache
from gateway.routing_table import ModelRouter, RoutingTable, static_table
from mss.config import ClusterConfig, GatewaySettings
from mss.security import load_credentials

log = logging.getLogger("gateway")

VERSION = "0.1.0"
REJECTION_REASONS = {401: "auth", 429: "rate", 503: "capacity"}
"""`mss_gateway_rejections_total` reasons by status; other 4xx are `invalid`."""


@dataclass
class GatewayOptions:
    """Everything a gateway process needs; JSON-serialisable for worker processes."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    replicas: list[tuple[str, str]] = field(default_factory=list)
    """Static routes, (model, host:port), used when no controller is given."""
    controller: str | None = None
    routing: str | None = None
    """Strategy for every model of the static table, overriding the config."""
    workers: int = 1
    replica_streams: int = 1
    log_format: str = "text"
    log_level: str = "INFO"

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "config": self.config.model_dump(mode="json"),
                "replicas": self.replicas,
                "controller": self.controller,
                "routing": self.routing,
                "workers": self.workers,
                "replica_streams": self.replica_streams,
                "log_format": self.log_format,
                "log_level": self.log_level,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> GatewayOptions:
        raw = orjson.loads(text)
        raw["config"] = ClusterConfig.model_validate(raw["config"])
        raw["replicas"] = [(m, a) for m, a in raw["replicas"]]
        return cls(**raw)


def rejection_reason(exc: ApiError) -> str | None:
    """How a refusal is counted in `mss_gateway_rejections_total`; None: it is not a refusal.

    Refusals turn a request away: bad input (`invalid`: any 4xx but 401 and
    429, whether the gateway or a replica found it), no or a wrong API key
    (`auth`), a client or key over its limit (`rate`), a model or all its replicas
    busy (`capacity`: 503). A model with no ready replica and the other 5xx
    (a replica failing or timing out, an internal error) are outages instead, as is
    a cold start that outlasts its timeout.
    """
    if exc.code in ("no_replica", "cold_start_timeout"):
        return None
    reason = REJECTION_REASONS.get(exc.status)
    if reason is None and exc.status < 500:
        reason = "invalid"
    return reason


class Gateway:
    """The state one gateway process serves from."""

    def __init__(self, options: GatewayOptions) -> None:
        self.options = options
        self.settings: GatewaySettings = options.config.gateway
        self.creds = load_credentials(options.config.security, "gateway")
        self.table = RoutingTable(
            workers=options.workers,
            replica_streams=options.replica_streams,
            failure_threshold=self.settings.replica_failure_threshold,
            client_factory=functools.partial(ReplicaClient, creds=self.creds),
            prefix_routing=self.settings.prefix_routing,
        )
        self.response_cache = ResponseCache(self.settings.response_cache)
        self.generation = GenerationService(
            retries=self.settings.retries,
            buffer_chunks=self.settings.stream_buffer_chunks,
            slow_client_timeout_s=self.settings.slow_client_timeout_s,
            limiter=ClientLimiter(self.settings.max_in_flight_per_client),
            cache=self.response_cache,
        )
        self.cold_starts = ColdStarts(self.table, self.settings.hold_keepalive_s)
        self.keys = KeyStore(self.settings)
        self.started = int(time.time())
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.response_cache.start()
        tasks = self._tasks
        tasks.append(asyncio.create_task(self.generation.watchdog(), name="slow-client-watchdog"))
        tasks.append(asyncio.create_task(self._refresh_gauges(), name="gauge-refresh"))
        if self.keys.path is not None:
            tasks.append(asyncio.create_task(self.keys.watch(), name="keys-file-watch"))
        if self.options.controller:
            from gateway.load_reporter import LoadReporter
            from gateway.route_watcher import RouteWatcher

            watcher = RouteWatcher(self.options.controller, self.table.apply, self.creds)
            tasks.append(asyncio.create_task(watcher.run(), name="route-watcher"))
            reporter = LoadReporter(
                self.options.controller,
                self.table,
                self.cold_starts.held,
                self.creds,
                self.settings.load_report_interval_s,
            )
            self.cold_starts.on_held = reporter.nudge
            tasks.append(asyncio.create_task(reporter.run(), name="load-reporter"))
            log.info("watching routes from the controller at %s", self.options.controller)
        else:
            table = static_table(self.options.replicas, self.options.config, self.options.routing)
            self.table.apply(table)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.generation.close()
        await self.response_cache.close()
        await self.table.close()

    async def _refresh_gauges(self) -> None:
        while True:
            self.table.refresh_gauges()
            await asyncio.sleep(1.0)

    def router_for(self, model: str) -> ModelRouter:
        """The model's router; an empty name is the only model when there is one (as vLLM)."""
        if not model:
            if len(self.table.models) == 1:
                return next(iter(self.table.models.values()))
            raise ApiError(
                400, "model: required (this gateway serves several models)", param="model"
            )
        router = self.table.get(model)
        if router is None:
            known = ", ".join(sorted(self.table.models)) or "none"
            msg = f"The model `{quote(model)}` does not exist. Valid models: {known}."
            raise ApiError(404, msg, param="model", code="model_not_found")
        return router

    def check_auth(self, headers: Mapping[str, str]) -> KeyLimiter | None:
        """The caller's API key (its limiter) from the request's `headers`; raises 401 when
        keys are configured and it is missing or not one in force. None when no keys are
        configured."""
        if not self.keys.enabled:
            return None
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        key = self.keys.lookup(presented.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            msg = "missing or invalid API key (Authorization: Bearer <key>)"
            raise ApiError(401, msg, code="invalid_api_key")
        return key

    async def serve(
        self, scope: dict[str, Any], receive: Any, send: Any, route: str, path_model: str | None
    ) -> None:
        """Answer one generation request to `route` and count how it ended.

        `path_model` is the model named in the path (the seed route), else None.
        Assumes nothing was sent yet; the request id is `scope["state"]["request_id"]`
        when the app set one.
        """
        rid = scope.get("state", {}).get("request_id") or os.urandom(8).hex()
        headers = request_headers(scope)
        label = ""  # the model, once the table knows it: a metric label, so labels stay few
        generating = False
        hold: Hold | None = None
        try:
            key = self.check_auth(headers)
            body, is_json = await read_body(
                headers, receive, self.settings.max_body_bytes, allow_text=route == SEED_ROUTE
            )
            if path_model is not None:  # named in the path: unknown is 404 whatever the body
                label = self.router_for(path_model).name
            model, inp = parse_body(route, path_model, body, is_json, headers.get("x-session-id"))
            router = self.router_for(model)
            label = router.name
            if inp.request_id and "x-request-id" not in headers:
                rid = inp.request_id
            request = GenerationRequest(
                inp=inp,
                max_tokens=check_max_tokens(inp, router.max_tokens),
                fmt=make_format(route, rid, router.name, inp, fingerprint(router)),
                client_key=f"key:{key.id}" if key else _address(scope),
                key=key,
            )
            generating = True
            if self.cold_starts.needs_hold(router):  # autoscaled, and no replica ready yet
                fmt = request.fmt if inp.stream else None
                hold = self.cold_starts.enter(router, send, fmt, rid)
                await hold.wait(receive)
                send = hold.send
            out = inp.output
            if out is not None and out.echo and inp.prompt_token_ids and not out.return_token_ids:
                # A prompt of token ids is echoed as its text: a ready replica decodes it,
                # after any hold for a replica to start.
                out.echo_text = await tokenize_api.prompt_text(router, inp.prompt_token_ids)
            status = await self.generation.run(scope, receive, send, router, request)
        except ClientDisconnect:
            status = 499  # gone before its whole body: nothing to answer, nothing went wrong
            path = quote(repr(scope["path"]))
            log.info("client left before sending its whole request to %s", path)
        except HoldAbandoned:
            status = 499
        except ApiError as exc:
            status = exc.status
            reason = rejection_reason(exc)
            if reason is not None:
                metrics.REJECTIONS.labels(label, reason).inc()
            if hold is not None and hold.opened:  # the stream's 200 went out while held
                await hold.fail(exc)
            else:
                await send_error(send, exc, (b"x-request-id", rid.encode()))
        except Exception:
            if generating:  # bytes may have gone out: the server ends the response
                raise
            log.exception("unexpected error reading a request to %s", scope["path"])
            status = 500
            err = ApiError(status, "internal error; see the gateway log", code="internal")
            await send_error(send, err, (b"x-request-id", rid.encode()))
        finally:
            if hold is not None:
                hold.done()
        metrics.count_request(label, route, status)
        log.debug("%s %s answered %d", route, label, status)


def fingerprint(router: ModelRouter) -> str:
    """`system_fingerprint`: this build and the model's serving settings, as vLLM's
    `vllm-<version>-<hash8>` names its build and configuration."""
    return _fingerprint(router.name, router.max_model_len(), router.max_tokens)


@functools.lru_cache(maxsize=256)
def _fingerprint(model: str, max_model_len: int | None, max_tokens: int) -> str:
    key = f"{model}|{max_model_len}|{max_tokens}".encode()
    return f"mss-{VERSION}-{hashlib.blake2b(key, digest_size=4).hexdigest()}"


def _address(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"
