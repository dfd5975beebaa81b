"""A thin, synchronous client for the RunPod REST v2 API (reference: runpod.md sections 1b and 8).

One shared ``httpx.Client`` carries every request. Failures become the ``RunPodError`` family from
``llmpod.errors``, with one-line messages that say what RunPod said and never contain the API key.

Retries happen here, so callers see only final outcomes:

- 429: wait ``Retry-After`` (seconds or an HTTP date, capped at 60 s, 2 s when absent), then retry.
- 5xx, timeouts and network errors: back off 1, 2, 4, 8 ... s (capped at 30 s), then retry.
- ``create_pod`` never retries a 5xx or a timeout: the pod may exist anyway (a v1 500 after creating a
  billed pod: transformerlab-app#2305). The caller looks the pod up by name before trying again. A
  connect error or connect timeout is still retried there, since no request reached RunPod.
- 400, 401, 402, 403, 404, 409 and 422 are never retried. A 403 on create is ``PoolForbiddenError`` (no access
  to that GPU type's pool: the caller tries the next one); anywhere else it is ``RunPodAuthError``.
- A network failure's message names the API address and the reason ("cannot reach https://api.runpod.io:
  connection refused"), never the key.

Reading an answer (Retry-After, error bodies, log-stream events) is ``runpod_answers``'s; this module decides.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from llmpod.errors import (
    NoCapacityError,
    PoolForbiddenError,
    RunPodAuthError,
    RunPodBalanceError,
    RunPodError,
    RunPodNotFound,
    RunPodRateLimited,
    RunPodRequestError,
    RunPodUnavailable,
)
from llmpod.pod.providers._network import network_reason
from llmpod.pod.providers.runpod_answers import (
    attempts,
    backoff,
    describe,
    exc_text,
    retry_after,
    snippet,
    sse_lines,
)
from llmpod.pod.providers.runpod_models import CreatePodRequest, GpuType, Pod, shape

DEFAULT_API_BASE = "https://api.runpod.io"
POD_URL_TEMPLATE = "https://{pod_id}-{port}.proxy.runpod.net"

FOLLOW_IDLE = 120.0  # a log stream silent this long is reconnected (the spec documents no heartbeat)
_SSE = {"Accept": "text/event-stream"}

# v2 has no machine-readable capacity code, only `detail` (runpod.md 1b); the others are v1/GraphQL wordings (7)
_NO_CAPACITY = re.compile(
    r"could not be placed|no (?:longer any )?instances|not enough free gpus|"
    r"(?:no|insufficient|out of) (?:gpu )?capacity|no (?:gpu )?availability",
    re.IGNORECASE,
)


class RunPodClient:
    """RunPod REST v2: pods, their logs and the GPU catalog. Use as a context manager, or call ``close``."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_API_BASE,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        max_retries: int = 4,
        sleep: Callable[[float], None] = time.sleep,
        follow_idle: float = FOLLOW_IDLE,
    ) -> None:
        self._key = api_key
        self._base = base_url.rstrip("/")
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._follow_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0), read=follow_idle)
        self._max_retries = max_retries
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._client = httpx.Client(transport=transport, timeout=self._timeout, headers=headers)

    def __repr__(self) -> str:
        return f"RunPodClient(base_url={self._base!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RunPodClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def list_pods(self) -> list[Pod]:
        """Every pod on the account (``GET /v2/pods``); filtering is the caller's job."""
        data = self._json(self._request("GET", "/v2/pods"))
        pods = data.get("pods") if isinstance(data, dict) else data
        if not isinstance(pods, list):
            raise RunPodError(f"RunPod GET /v2/pods: unexpected body ({shape(data)})")
        return [Pod.from_json(item) for item in pods]

    def get_pod(self, pod_id: str) -> Pod | None:
        """One pod, or None when RunPod does not know it (404)."""
        response = self._request("GET", _pod_path(pod_id), allow=(404,))
        return None if response.status_code == 404 else Pod.from_json(self._json(response))

    def create_pod(self, request: CreatePodRequest) -> Pod:
        """Create a pod (``POST /v2/pods``). A 5xx or timeout is not retried: look the pod up by name first.
        A 403 is ``PoolForbiddenError``: the spec's create table says the account cannot use that pool."""
        try:
            response = self._request("POST", "/v2/pods", json_body=request.body(), idempotent=False)
        except RunPodAuthError as exc:
            if exc.status != 403:
                raise
            raise PoolForbiddenError(f"{exc} (this account has no access to the {request.gpu.id} pool)", 403) from None
        return Pod.from_json(self._json(response))

    def delete_pod(self, pod_id: str) -> bool:
        """Terminate a pod. True when RunPod terminated it, False when it was already gone (404)."""
        return self._request("DELETE", _pod_path(pod_id), allow=(404,)).status_code != 404

    def check_key(self) -> None:
        """A cheap authenticated call: raises ``RunPodAuthError`` when the key is missing, wrong or revoked."""
        self._request("GET", "/v2/pods")

    def pod_logs(self, pod_id: str, tail: int = 20, wait: float = 2.0) -> list[str]:
        """Up to ``tail`` recent log lines, read for about ``wait`` seconds. Best effort: never raises.

        The stream stays open for live lines, so the read stops at the deadline, after ``tail`` lines, or
        at a read timeout of ``wait``. Lines already read are kept if the stream then fails.
        """
        if tail <= 0:
            return []
        deadline = time.monotonic() + wait
        lines: list[str] = []
        try:
            response = self._request(
                "GET",
                _pod_path(pod_id) + "/logs",
                params={"tail": tail},
                stream=True,
                retries=0,
                headers=_SSE,
                timeout=httpx.Timeout(max(wait, 0.1)),
            )
        except RunPodError:
            return []
        try:
            for _, line in sse_lines(response.iter_lines()):
                lines.append(line)
                if len(lines) >= tail or time.monotonic() >= deadline:
                    break
        except httpx.HTTPError:
            pass
        finally:
            response.close()
        return lines

    def follow_logs(self, pod_id: str, tail: int = 100) -> Iterator[str]:
        """Yield log lines until RunPod ends the stream, reconnecting after a drop.

        A reconnect sends the last event ``id:`` back as ``Last-Event-ID`` exactly as received (the
        spec's ids carry a sequence suffix, so they are not rebuilt from ``ts``). Drops with no line
        in between count against ``max_retries``; a stream that was merely silent for ``follow_idle``
        seconds is reopened without counting. A 404 on reopening means the pod has gone meanwhile: its
        log is over, and the lines simply end. Other HTTP errors raise as elsewhere.
        """
        path = _pod_path(pod_id) + "/logs"
        last_id: str | None = None
        failures = 0
        opened = False
        while True:
            # the server ignores tail once Last-Event-ID is sent
            headers, params = (_SSE, {"tail": tail}) if last_id is None else ({**_SSE, "Last-Event-ID": last_id}, {})
            response = self._request(
                "GET",
                path,
                params=params,
                headers=headers,
                stream=True,
                timeout=self._follow_timeout,
                allow=(404,) if opened else (),
            )
            if response.status_code == 404:
                response.close()
                return
            opened = True
            try:
                for event_id, line in sse_lines(response.iter_lines()):
                    last_id = event_id if event_id is not None else last_id
                    failures = 0
                    yield line
                return
            except httpx.ReadTimeout:
                continue
            except httpx.TransportError as exc:
                failures += 1
                if failures > self._max_retries:
                    raise RunPodUnavailable(
                        self._redact(f"RunPod GET {path}: log stream dropped {failures} times ({exc_text(exc)})")
                    ) from None
                self._sleep(backoff(failures - 1))
            finally:
                response.close()

    def gpu_types(
        self,
        cloud: str = "SECURE",
        *,
        availability: bool = True,
        min_cuda_version: str | None = None,
        retries: int | None = None,
    ) -> list[GpuType]:
        """The GPU catalog, with pod availability on ``cloud`` unless ``availability`` is False; with
        ``min_cuda_version``, availability counts only hosts whose CUDA is at least that (the image's floor).
        ``retries`` overrides the client's (a refresh tries once, then keeps the data it has)."""
        # include=AVAILABILITY requires product, and product/cloud/minCudaVersion are valid only with it (400 otherwise)
        params = [("include", "AVAILABILITY"), ("product", "POD"), ("cloud", cloud)] if availability else []
        if availability and min_cuda_version is not None:
            params.append(("minCudaVersion", min_cuda_version))
        data = self._json(self._request("GET", "/v2/catalog/gpus", params=params, retries=retries))
        gpus = data.get("gpus") if isinstance(data, dict) else None
        if not isinstance(gpus, list):
            raise RunPodError(f"RunPod GET /v2/catalog/gpus: unexpected body ({shape(data)})")
        return [GpuType.from_json(item) for item in gpus]

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        allow: tuple[int, ...] = (),
        idempotent: bool = True,
        stream: bool = False,
        retries: int | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send with the retry policy; return a 2xx response (or one whose status is in ``allow``)."""
        max_retries = self._max_retries if retries is None else retries
        where = f"RunPod {method} {path}"
        attempt = 0
        while True:
            request = self._client.build_request(
                method,
                self._base + path,
                params=params,
                json=json_body,
                headers=headers,
                timeout=timeout or self._timeout,
            )
            status: int | None = None
            try:
                response = self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing reached RunPod: always safe
                failure, retryable = f"cannot reach {self._address()}: {network_reason(exc)}", True
            except httpx.TimeoutException as exc:
                failure, retryable = f"{self._address()} did not answer: {network_reason(exc)}", idempotent
            except httpx.TransportError as exc:
                failure, retryable = f"connection to {self._address()} failed: {network_reason(exc)}", idempotent
            else:
                status = response.status_code
                if status < 400 or status in allow:
                    return response
                if stream:
                    response.read()
                    response.close()
                if status == 429:
                    wait = retry_after(response.headers.get("Retry-After"))
                    if attempt >= max_retries:
                        message = f"{where}: {describe(response)}{attempts(attempt)}"
                        raise RunPodRateLimited(self._redact(message), retry_after=wait)
                    self._sleep(wait)
                    attempt += 1
                    continue
                if status < 500:
                    raise self._client_error(where, response)
                failure, retryable = describe(response), idempotent
            if not retryable:
                message = f"{where}: {failure} (not retried: the pod may have been created)"
                raise RunPodUnavailable(self._redact(message), status)
            if attempt >= max_retries:
                raise RunPodUnavailable(self._redact(f"{where}: {failure}{attempts(attempt)}"), status)
            self._sleep(backoff(attempt))
            attempt += 1

    def _client_error(self, where: str, response: httpx.Response) -> RunPodError:
        status = response.status_code
        message = self._redact(f"{where}: {describe(response)}")
        if status in (401, 403):
            return RunPodAuthError(message, status)
        if status == 402:
            return RunPodBalanceError(message, status)
        if status == 404:
            return RunPodNotFound(message, status)
        if status == 400 and _NO_CAPACITY.search(message):
            return NoCapacityError(message, status)
        return RunPodRequestError(message, status)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            where = f"RunPod {response.request.method} {response.request.url.path}"
            raise RunPodError(
                self._redact(f"{where}: not JSON: {snippet(response.text)}"), response.status_code
            ) from None

    def _address(self) -> str:
        """The API base as the user set it (``RUNPOD_API_BASE``), without any user:password in it."""
        try:
            return str(httpx.URL(self._base).copy_with(username=None, password=None))
        except (httpx.InvalidURL, TypeError, ValueError):
            return "the RunPod API"

    def _redact(self, message: str) -> str:
        # RunPod could echo the token back in a detail; keep it out of every message we raise
        return message.replace(self._key, "***") if self._key else message


def _pod_path(pod_id: str) -> str:
    return "/v2/pods/" + quote(pod_id, safe="")
