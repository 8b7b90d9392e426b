"""Chat backend for OpenAI-compatible model servers (vLLM, TGI, llama.cpp server, ...).

Speaks `POST {base_url}/chat/completions` and `GET {base_url}/models`. A batch of conversations is
sent as concurrent requests (at most `max_concurrency` in flight) over one shared `httpx.Client`;
transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential
backoff, other 4xx responses fail at once.

The API key is never part of a stored configuration: the Dagster resource resolves it from the environment at
launch (`dg.EnvVar`), standalone use reads the environment variable named by `api_key_env`; either way it is sent
only as a Bearer header and kept out of `repr`, logs and error messages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx

from matrix_assets.llm.base import (
    BackendError, ChatBackend, Completion, Conversation, GenerationParams, Job, LogprobsUnavailable, OnCompletion,
    PermanentBackendError, TakeJobs, candidate_variants,
)

logger = logging.getLogger(__name__)

OnResult = Callable[[int, Completion], None]

_MAX_RETRY_AFTER_S = 60.0
_HEALTH_TIMEOUT_S = 5.0
_BODY_SNIPPET_CHARS = 300
TOP_LOGPROBS = 20  # OpenAI's maximum and vLLM's default --max-logprobs


class _Cancelled(Exception):
    """A request abandoned because another request of the same batch failed permanently."""


class OpenAICompatibleBackend(ChatBackend):
    """`ChatBackend` over an OpenAI-compatible `/chat/completions` endpoint.

    `base_url` is the API root including the version segment, e.g. `http://localhost:8000/v1`.
    `max_retries` is the number of retries after the first attempt (so at most `max_retries + 1`
    attempts per conversation); the n-th retry waits `backoff_s * 2**(n-1)` seconds (longer if the
    server sends `Retry-After` on a 429/503, capped at 60 s).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        *,
        client: httpx.Client | None = None,
        api_key: str | None = None,
    ) -> None:
        if not base_url:
            raise ValueError("base_url must not be empty")
        if not model:
            raise ValueError("model must not be empty")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self._key = api_key or None  # resolved by the caller (Dagster's EnvVar); never in repr or logs
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.model_id = f"openai:{model}@{self.base_url}"

        self._chat_url = f"{self.base_url}/chat/completions"
        self._models_url = f"{self.base_url}/models"
        self._timeout = httpx.Timeout(self.timeout_s)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(
            timeout=self._timeout,
            limits=httpx.Limits(
                max_connections=self.max_concurrency,
                max_keepalive_connections=self.max_concurrency,
            ),
        )

    # ------------------------------------------------------------------ public API

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"timeout_s={self.timeout_s:g}, max_retries={self.max_retries}, backoff_s={self.backoff_s:g})"
        )

    def __enter__(self) -> OpenAICompatibleBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client if this backend created it (an injected client is left open)."""
        if self._owns_client:
            self._client.close()

    def check_health(self) -> list[str]:
        """Fail fast if the server cannot be reached: `GET {base_url}/models` with a short timeout.

        Returns the model ids the server lists (empty if it lists none or answers in another shape).
        Raises `BackendError("model server at URL unreachable: ...")` on connection errors, timeouts
        and error statuses. A served-model list that lacks `model` only logs a warning, because
        several servers (llama.cpp, TGI) list names that differ from the one requests use.
        """
        timeout = httpx.Timeout(min(self.timeout_s, _HEALTH_TIMEOUT_S))
        try:
            response = self._client.get(self._models_url, headers=self._headers(), timeout=timeout)
        except httpx.TimeoutException as exc:
            raise BackendError(
                self._redact(
                    f"model server at {self.base_url} unreachable: no answer from {self._models_url} "
                    f"within {timeout.read:g}s ({type(exc).__name__})"
                )
            ) from None
        except httpx.HTTPError as exc:
            raise BackendError(
                self._redact(f"model server at {self.base_url} unreachable: {type(exc).__name__}: {exc}")
            ) from None
        if response.status_code >= 400:
            raise BackendError(
                self._redact(
                    f"model server at {self.base_url} unreachable: GET {self._models_url} returned "
                    f"HTTP {response.status_code}: {_snippet(response)}"
                )
            )
        model_ids: list[str] = []
        try:
            data = response.json().get("data", [])
            model_ids = [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]
        except (ValueError, AttributeError, TypeError):
            logger.warning("model server at %s answered /models with an unexpected body", self.base_url)
        if model_ids and self.model not in model_ids:
            logger.warning(
                "model %r is not among the models served at %s: %s", self.model, self.base_url, model_ids
            )
        return model_ids

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """Return one completion per conversation, in order."""
        return self.generate_streaming(conversations, params)

    def generate_streaming(
        self,
        conversations: Sequence[Conversation],
        params: GenerationParams,
        on_result: OnResult | None = None,
    ) -> list[Completion]:
        """Like `generate`, and call `on_result(index, completion)` as each request finishes.

        `on_result` runs in the calling thread, in completion order (not input order), so callers can
        persist finished generations before a later request fails. If a request fails permanently,
        requests not yet started are abandoned, the ones in flight are awaited (their successes are
        still passed to `on_result`), and then `BackendError` is raised.
        """
        n = len(conversations)
        if n == 0:
            return []
        results: list[Completion | None] = [None] * n
        queue = [Job(i, conversation, params) for i, conversation in enumerate(conversations)]

        def take(limit: int | None) -> list[Job]:
            taken = queue[:limit] if limit is not None else queue[:]
            del queue[: len(taken)]
            return taken

        def deliver(job: Job, completion: Completion) -> None:
            results[job.id] = completion
            if on_result is not None:
                on_result(job.id, completion)

        failures, delivered = self._run(take, deliver)
        if failures:
            job, first = min(failures, key=lambda item: item[0].id)
            raise type(first)(
                f"{first} [conversation {job.id} of {n}; {len(failures)} request(s) failed permanently, "
                f"{delivered} of {n} completed before the batch was stopped]"
            ) from first
        return [completion for completion in results if completion is not None]

    def serve(self, take: TakeJobs, on_completion: OnCompletion) -> None:
        """Live session: keep `max_concurrency` requests in flight, taking a queued job whenever one finishes,
        so a server with continuous batching (vLLM, TGI) always has work. `on_completion` runs in the calling
        thread as each request finishes (it may queue more jobs). A request that fails permanently stops the
        session like it stops `generate_streaming`: no new job is taken, the ones in flight are awaited (their
        successes still delivered), then `BackendError` is raised."""
        failures, delivered = self._run(take, on_completion)
        if failures:
            raise type(failures[0][1])(
                f"{failures[0][1]} [{len(failures)} request(s) failed permanently, {delivered} completed before "
                "the session was stopped]"
            ) from failures[0][1]

    def _run(self, take: TakeJobs, on_completion: OnCompletion) -> tuple[list[tuple[Job, BackendError]], int]:
        """Keep up to `max_concurrency` jobs in flight until `take` has none left; returns the permanent failures
        and how many jobs were delivered. After the first failure no job is taken and those not started are
        cancelled; if `on_completion` raises (or the caller is interrupted), the rest is abandoned at once."""
        stop = threading.Event()
        failures: list[tuple[Job, BackendError]] = []
        delivered = 0
        in_flight: dict[Future[Completion], Job] = {}
        executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="openai-backend")
        try:
            while True:
                if not failures and len(in_flight) < self.max_concurrency:
                    for job in take(self.max_concurrency - len(in_flight)):
                        future = executor.submit(self._request_with_retries, job.id,
                                                 self._payload(job.conversation, job.params), stop, self._parse)
                        in_flight[future] = job
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = in_flight.pop(future)
                    try:
                        completion = future.result()
                    except (_Cancelled, CancelledError):
                        continue
                    except BackendError as exc:
                        failures.append((job, exc))
                    except Exception as exc:  # unexpected bug in parsing etc.: still report as a backend error
                        failures.append((job, BackendError(self._redact(f"request to {self._chat_url} failed: {exc!r}"))))
                    else:
                        delivered += 1
                        on_completion(job, completion)
                        continue
                    if len(failures) == 1:
                        stop.set()
                        for other in in_flight:
                            other.cancel()
        except BaseException:
            stop.set()
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)
        return failures, delivered

    def load_adapter(self, name: str, path: str) -> None:
        """Have the server load a LoRA adapter under `name` (vLLM: `POST {base_url}/load_lora_adapter`, served with
        `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`); an adapter already loaded under that name is
        fine. `path` is the adapter folder as the server sees it."""
        url = f"{self.base_url}/load_lora_adapter"
        try:
            response = self._client.post(url, json={"lora_name": name, "lora_path": path}, headers=self._headers(),
                                         timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise BackendError(self._redact(f"model server at {self.base_url} unreachable: {type(exc).__name__}: "
                                            f"{exc}")) from None
        body = _snippet(response)
        if response.status_code < 300 or "already" in body.lower():
            return
        raise BackendError(self._redact(
            f"model server at {self.base_url} did not load adapter {name!r} from {path} (HTTP {response.status_code}: "
            f"{body}); serve with vLLM's --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and make the "
            "adapter folder readable by the server at that path (adapter_path_on_server maps it)"))

    def next_token_logprobs(
        self, conversations: Sequence[Conversation], candidates: Sequence[str], *, assistant_prefix: str = ""
    ) -> list[dict[str, float]]:
        """One-token completions with `logprobs` and `top_logprobs` (vLLM, llama.cpp server and OpenAI return
        them): each candidate's log-probability is summed over the returned top tokens that spell it. A
        candidate outside the top `TOP_LOGPROBS` gets -inf. An `assistant_prefix` is sent as a final assistant
        message that the server continues (vLLM's `continue_final_message`). A server that answers without
        log-probabilities raises `LogprobsUnavailable`: the caller then reports the verdict as missing."""
        if not conversations:
            return []
        stop = threading.Event()

        def one(index: int) -> dict[str, float]:
            payload = self._payload(conversations[index], GenerationParams(max_new_tokens=1, temperature=0.0))
            payload.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
            if assistant_prefix:
                payload["messages"].append({"role": "assistant", "content": assistant_prefix})
                payload.update(continue_final_message=True, add_generation_prompt=False)
            top = self._request_with_retries(index, payload, stop, self._parse_top_logprobs)
            return _candidate_logprobs(top, candidates)

        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="openai-logprobs") as pool:
            try:
                return list(pool.map(one, range(len(conversations))))
            finally:
                stop.set()

    # ------------------------------------------------------------------ internals

    def _parse_top_logprobs(self, response: httpx.Response) -> list[tuple[str, float]]:
        try:
            choice = response.json()["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(self._redact(
                f"model server at {self.base_url} returned an unexpected body: {_snippet(response)}")) from None
        content = ((choice.get("logprobs") or {}).get("content") or []) if isinstance(choice, dict) else []
        if not content or not content[0].get("top_logprobs"):
            raise LogprobsUnavailable(
                f"model server at {self.base_url} returned no log-probabilities for logprobs=true, "
                f"top_logprobs={TOP_LOGPROBS} (vLLM and llama.cpp server return them; this server does not), "
                "so verdicts cannot be read from it"
            )
        return [(str(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"]]

    def _api_key(self) -> str | None:
        if self._key:
            return self._key
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def _headers(self) -> dict[str, str]:
        key = self._api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redact(self, text: str) -> str:
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _payload(self, conversation: Conversation, params: GenerationParams) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.repetition_penalty != 1.0:
            # Not OpenAI's API (it has none): vLLM's and TGI's extension. Sent only when asked for, so a server
            # without it fails loudly rather than caching text made without the penalty the key promises.
            payload["repetition_penalty"] = params.repetition_penalty
        if params.json_schema:
            # OpenAI's structured-output field, which vLLM, TGI and llama.cpp server also accept.
            payload["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "reply", "schema": json.loads(params.json_schema), "strict": True}}
        return payload

    def _request_with_retries(
        self, index: int, payload: dict[str, Any], stop: threading.Event, parse: Callable[[httpx.Response], Any]
    ) -> Any:
        attempts = self.max_retries + 1
        last_error = "no attempt made"
        for attempt in range(attempts):
            if stop.is_set():
                raise _Cancelled()
            retry_after: float | None = None
            try:
                response = self._client.post(
                    self._chat_url, json=payload, headers=self._headers(), timeout=self._timeout
                )
            except httpx.TimeoutException as exc:
                last_error = f"timed out after {self.timeout_s:g}s ({type(exc).__name__})"
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                raise PermanentBackendError(self._redact(f"bad server URL {self._chat_url}: {exc}")) from None
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return parse(response)
                if status == 429 or status >= 500:
                    last_error = f"HTTP {status}: {_snippet(response)}"
                    retry_after = _retry_after(response)
                else:
                    raise PermanentBackendError(
                        self._redact(
                            f"model server at {self.base_url} rejected the request to {self._chat_url} "
                            f"with HTTP {status} (not retried): {_snippet(response)}"
                        )
                    )
            if attempt + 1 < attempts:
                delay = self.backoff_s * (2**attempt)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, _MAX_RETRY_AFTER_S))
                logger.warning(
                    "request %d to %s failed (%s); retry %d/%d in %.2fs",
                    index, self._chat_url, self._redact(last_error), attempt + 1, self.max_retries, delay,
                )
                if stop.wait(delay):
                    raise _Cancelled()
        raise BackendError(
            self._redact(
                f"model server at {self.base_url}: request to {self._chat_url} failed after "
                f"{attempts} attempt(s); last error: {last_error}"
            )
        )

    def _parse(self, response: httpx.Response) -> Completion:
        try:
            body = response.json()
            message = body["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(
                self._redact(
                    f"model server at {self.base_url} returned an unexpected chat completion body from "
                    f"{self._chat_url}: {_snippet(response)}"
                )
            ) from None
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            usage = {}
        return Completion(
            # Stripped like the in-process engine's text, so both engines store the same answer for the same tokens
            # (vLLM keeps a trailing space where the last token is one).
            text=content.strip() if isinstance(content, str) else "",
            prompt_tokens=_as_int(usage.get("prompt_tokens")),
            completion_tokens=_as_int(usage.get("completion_tokens")),
        )


def _candidate_logprobs(top: list[tuple[str, float]], candidates: Sequence[str]) -> dict[str, float]:
    out = {}
    for candidate in candidates:
        spellings = {v.strip().lower() for v in candidate_variants(candidate)}
        matched = [lp for token, lp in top if token.strip().lower() in spellings and token.strip()]
        out[candidate] = math.log(sum(math.exp(lp) for lp in matched)) if matched else float("-inf")
    return out


def _as_int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _snippet(response: httpx.Response) -> str:
    try:
        text = response.text
    except Exception:  # undecodable body
        return "<unreadable body>"
    text = " ".join(text.split())
    if len(text) > _BODY_SNIPPET_CHARS:
        text = text[:_BODY_SNIPPET_CHARS] + "..."
    return text or "<empty body>"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # HTTP-date form: fall back to exponential backoff
    return seconds if seconds >= 0 else None
