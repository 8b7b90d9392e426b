"""OpenAICompatibleBackend against a small real HTTP server running in a thread."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from http_helpers import JsonHandler, free_port

from matrix_assets.llm.base import BackendError, Completion, GenerationParams
from matrix_assets.llm.openai_backend import OpenAICompatibleBackend

SECRET = "sk-test-very-secret-0123456789"
HOLD_TIMEOUT_S = 10.0  # a held request answers anyway after this long, so a broken client fails instead of hanging


class FakeServerState:
    """Behaviour switches and recordings shared by all handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown to free hanging handlers
        self.sleep_s = 0.0
        self.sleep_for: Callable[[dict[str, Any]], float] | None = None  # per-request delay, overrides sleep_s
        self.hold_until: Callable[[dict[str, Any]], Callable[[], bool] | None] | None = None  # answer once true
        self.fail_next = 0  # answer the next N chat requests with `fail_status`
        self.fail_status = 500
        self.fail_after: int | None = None  # answer every chat request after the first K with 500
        self.hang_s = 0.0  # sleep this long before answering a chat request
        self.omit_usage = False
        self.chat_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.running: list[str] = []  # first message of each request in flight
        self.running_at_arrival: list[list[str]] = []  # `running` as each request arrived (itself included)
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: list[str | None] = []
        self.model_requests = 0
        self.logprobs = True  # answer logprobs=true requests with top_logprobs (vLLM and llama.cpp server do)


def _reply_for(body: dict[str, Any]) -> str:
    last_user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    return f"echo: {last_user}"


def make_handler(state: FakeServerState) -> type[JsonHandler]:
    class Handler(JsonHandler):
        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self.send_json(404, {"error": "not found"})
                return
            with state.lock:
                state.model_requests += 1
            self.send_json(200, {"object": "list", "data": [{"id": "echo-model", "object": "model"}]})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if self.path != "/v1/chat/completions":
                self.send_json(404, {"error": "not found"})
                return
            body = json.loads(raw)
            with state.lock:
                state.chat_requests += 1
                number = state.chat_requests
                state.bodies.append(body)
                state.auth_headers.append(self.headers.get("Authorization"))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.running.append(body["messages"][0]["content"])
                state.running_at_arrival.append(list(state.running))
                fail = False
                if state.fail_next > 0:
                    state.fail_next -= 1
                    fail = True
                if state.fail_after is not None and number > state.fail_after:
                    fail = True
            try:
                if state.hang_s:
                    state.release.wait(state.hang_s)
                condition = state.hold_until(body) if state.hold_until else None
                if condition is not None:
                    deadline = time.monotonic() + HOLD_TIMEOUT_S
                    while not condition() and time.monotonic() < deadline and not state.release.is_set():
                        time.sleep(0.01)
                delay = state.sleep_for(body) if state.sleep_for else state.sleep_s
                if delay:
                    time.sleep(delay)
                if fail:
                    # echo the Authorization header back to prove the client redacts error bodies
                    self.send_json(state.fail_status, {"error": "boom", "auth": self.headers.get("Authorization")})
                    return
                reply = _reply_for(body)
                payload: dict[str, Any] = {
                    "id": f"cmpl-{number}",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                    ],
                }
                if body.get("logprobs") and state.logprobs:
                    # Token spellings as servers return them: a leading space, another case.
                    top = [{"token": " Yes", "logprob": -0.4}, {"token": "yes", "logprob": -2.0},
                           {"token": " No", "logprob": -1.5}, {"token": "Maybe", "logprob": -3.0}]
                    payload["choices"][0]["logprobs"] = {"content": [{"token": " Yes", "logprob": -0.4,
                                                                      "top_logprobs": top}]}
                if not state.omit_usage:
                    prompt_words = sum(len(m["content"].split()) for m in body["messages"])
                    payload["usage"] = {
                        "prompt_tokens": prompt_words,
                        "completion_tokens": len(reply.split()),
                        "total_tokens": prompt_words + len(reply.split()),
                    }
                self.send_json(200, payload)
            finally:
                with state.lock:
                    state.in_flight -= 1
                    state.running.remove(body["messages"][0]["content"])

    return Handler


@pytest.fixture()
def server() -> Iterator[tuple[str, FakeServerState]]:
    state = FakeServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    try:
        yield f"http://{host}:{port}/v1", state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=2)


def _conversations(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question number {i}"}]
        for i in range(n)
    ]


def _backend(base_url: str, **kwargs: Any) -> OpenAICompatibleBackend:
    kwargs.setdefault("api_key_env", None)
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("backoff_s", 0.01)
    return OpenAICompatibleBackend(base_url, "echo-model", **kwargs)


def test_model_id_and_order_and_params(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    with _backend(base_url + "/", max_concurrency=4) as backend:
        assert backend.model_id == f"openai:echo-model@{base_url}"
        params = GenerationParams(max_new_tokens=17, temperature=0.7, top_p=0.9, seed=42, stop=("\n\n", "END"))
        completions = backend.generate(_conversations(10), params)

    assert [c.text for c in completions] == [f"echo: question number {i}" for i in range(10)]
    assert completions[3] == Completion(text="echo: question number 3", prompt_tokens=5, completion_tokens=4)
    assert len(state.bodies) == 10
    for body in state.bodies:
        assert body["model"] == "echo-model"
        assert body["max_tokens"] == 17
        assert body["temperature"] == 0.7
        assert body["top_p"] == 0.9
        assert body["seed"] == 42
        assert body["stop"] == ["\n\n", "END"]
        assert "max_new_tokens" not in body
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
    assert state.auth_headers == [None] * 10  # api_key_env=None sends no Authorization header


def test_empty_stop_omitted_and_missing_usage_is_zero(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.omit_usage = True
    with _backend(base_url) as backend:
        [completion] = backend.generate(_conversations(1), GenerationParams())
        assert backend.generate([], GenerationParams()) == []
    assert completion == Completion(text="echo: question number 0", prompt_tokens=0, completion_tokens=0)
    assert "stop" not in state.bodies[0]
    assert state.bodies[0]["max_tokens"] == 256
    assert "repetition_penalty" not in state.bodies[0]  # not OpenAI's API: sent only when asked for


def test_a_repetition_penalty_travels_as_vllms_extension(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    with _backend(base_url) as backend:
        backend.generate(_conversations(1), GenerationParams(repetition_penalty=1.1))
    assert state.bodies[0]["repetition_penalty"] == 1.1


def test_concurrency_is_bounded(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    # The first four requests answer only once four have reached the server: a client that sent one at a time
    # would leave the first waiting for HOLD_TIMEOUT_S (and its own read timeout would fail the test).
    state.hold_until = lambda body: ((lambda: len(state.bodies) >= 4)
                                     if any(body is first for first in state.bodies[:4]) else None)
    state.sleep_s = 0.05
    with _backend(base_url, max_concurrency=4) as backend:
        completions = backend.generate(_conversations(12), GenerationParams())
    assert len(completions) == 12
    assert state.max_in_flight == 4


def test_retries_on_500_then_succeeds(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.fail_next = 2
    with _backend(base_url, max_concurrency=1, max_retries=3) as backend:
        [completion] = backend.generate(_conversations(1), GenerationParams())
    assert completion.text == "echo: question number 0"
    assert state.chat_requests == 3


def test_retries_on_429(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.fail_next, state.fail_status = 1, 429
    with _backend(base_url, max_retries=2) as backend:
        [completion] = backend.generate(_conversations(1), GenerationParams())
    assert completion.text == "echo: question number 0"
    assert state.chat_requests == 2


def test_4xx_fails_at_once(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.fail_next, state.fail_status = 5, 400
    with _backend(base_url, max_retries=3) as backend:
        with pytest.raises(BackendError, match="HTTP 400") as excinfo:
            backend.generate(_conversations(1), GenerationParams())
    assert state.chat_requests == 1
    assert base_url in str(excinfo.value)


def test_retries_exhausted_raises_backend_error(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.fail_next = 100
    with _backend(base_url, max_retries=2) as backend:
        with pytest.raises(BackendError) as excinfo:
            backend.generate(_conversations(1), GenerationParams())
    message = str(excinfo.value)
    assert state.chat_requests == 3
    assert base_url in message
    assert "3 attempt" in message and "HTTP 500" in message


def test_permanent_failure_delivers_finished_results_first(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.fail_after = 3
    delivered: dict[int, Completion] = {}
    with _backend(base_url, max_concurrency=2, max_retries=1) as backend:
        with pytest.raises(BackendError) as excinfo:
            backend.generate_streaming(
                _conversations(8), GenerationParams(), on_result=lambda i, c: delivered.__setitem__(i, c)
            )
    assert len(delivered) == 3
    for index, completion in delivered.items():
        assert completion.text == f"echo: question number {index}"
    assert base_url in str(excinfo.value)
    # the batch stops instead of grinding through all remaining conversations with retries
    assert state.chat_requests < 3 + 8 * 2


def test_generate_streaming_calls_on_result_for_each(server: tuple[str, FakeServerState]) -> None:
    base_url, _ = server
    seen: list[int] = []
    with _backend(base_url, max_concurrency=3) as backend:
        completions = backend.generate_streaming(
            _conversations(5), GenerationParams(), on_result=lambda i, c: seen.append(i)
        )
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert [c.text for c in completions] == [f"echo: question number {i}" for i in range(5)]


def test_hang_times_out_with_backend_error(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    state.hang_s = 5.0
    with _backend(base_url, timeout_s=0.3, max_retries=1) as backend:
        started = time.monotonic()
        with pytest.raises(BackendError, match="timed out") as excinfo:
            backend.generate(_conversations(1), GenerationParams())
        elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert state.chat_requests == 2
    assert base_url in str(excinfo.value)


def test_check_health(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    with _backend(base_url) as backend:
        assert backend.check_health() == ["echo-model"]
    assert state.model_requests == 1


def test_check_health_unreachable_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with _backend(url, timeout_s=30.0) as backend:
        started = time.monotonic()
        with pytest.raises(BackendError, match="unreachable") as excinfo:
            backend.check_health()
        assert time.monotonic() - started < 2.0
    assert f"model server at {url} unreachable" in str(excinfo.value)


def test_unreachable_generate_raises_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with _backend(url, max_retries=2) as backend:
        with pytest.raises(BackendError) as excinfo:
            backend.generate(_conversations(2), GenerationParams())
    assert url in str(excinfo.value)
    assert "ConnectError" in str(excinfo.value)


def test_api_key_from_env_sent_but_never_shown(
    server: tuple[str, FakeServerState], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base_url, state = server
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MATRIX_TEST_KEY", SECRET)
    backend = OpenAICompatibleBackend(
        base_url, "echo-model", api_key_env="MATRIX_TEST_KEY", max_retries=1, backoff_s=0.01, timeout_s=5.0
    )
    try:
        assert SECRET not in repr(backend)
        assert "MATRIX_TEST_KEY" in repr(backend)
        assert SECRET not in str(vars(backend))

        backend.generate(_conversations(2), GenerationParams())
        assert state.auth_headers == [f"Bearer {SECRET}"] * 2

        # the fake server echoes the Authorization header in its error body; it must be redacted
        state.fail_next = 100
        with pytest.raises(BackendError) as excinfo:
            backend.generate(_conversations(1), GenerationParams())
        assert SECRET not in str(excinfo.value)
        assert "HTTP 500" in str(excinfo.value)

        state.fail_next, state.fail_status = 100, 401
        with pytest.raises(BackendError) as excinfo:
            backend.generate(_conversations(1), GenerationParams())
        assert SECRET not in str(excinfo.value)
        assert "HTTP 401" in str(excinfo.value)
        assert caplog.records  # the retries were logged ...
        assert SECRET not in caplog.text  # ... without the key
    finally:
        backend.close()


def test_live_session_refills_request_slots_without_waiting_for_a_wave(server: tuple[str, FakeServerState]) -> None:
    """Six chains of three dependent requests, four slots: a chain's next request goes out as soon as its
    previous answer arrives, while other chains' first requests are still in flight (a wave would wait)."""
    from matrix_assets.llm.base import Job

    base_url, state = server
    # Ordered by events, not by sleeps, so a loaded machine cannot reorder it: chain 0's first request answers once
    # all four slots' requests have reached the server; chains 1-3's first requests answer only once some chain's
    # second request has arrived. A live session sends chain 0's second request into the slot chain 0 freed (after
    # chains 4 and 5's quick first requests); a wave would wait for chains 1-3, which then answer only after
    # HOLD_TIMEOUT_S, and no second request would find them running.
    held = {f"chain {chain} step 0" for chain in (1, 2, 3)}

    def hold_until(body: dict[str, Any]) -> Callable[[], bool] | None:
        text = body["messages"][0]["content"]
        if text == "chain 0 step 0":
            return lambda: len(state.bodies) >= 4
        if text in held:
            return lambda: any(b["messages"][0]["content"].endswith("step 1") for b in list(state.bodies))
        return None

    state.hold_until = hold_until
    queue = [Job(chain * 10, [{"role": "user", "content": f"chain {chain} step 0"}], GenerationParams())
             for chain in range(6)]
    answered: list[int] = []

    def take(limit: int | None) -> list[Job]:
        n = len(queue) if limit is None else min(limit, len(queue))
        return [queue.pop(0) for _ in range(n)]

    def on_completion(job: Job, completion: Completion) -> None:
        assert completion.text == f"echo: {job.conversation[0]['content']}"
        answered.append(job.id)
        chain, step = divmod(job.id, 10)
        if step < 2:
            queue.append(Job(job.id + 1, [{"role": "user", "content": f"chain {chain} step {step + 1}"}],
                             GenerationParams()))

    started = time.monotonic()
    with _backend(base_url, max_concurrency=4) as backend:
        backend.serve(take, on_completion)
    assert sorted(answered) == sorted(chain * 10 + step for chain in range(6) for step in range(3))
    assert state.max_in_flight == 4
    sent = [body["messages"][0]["content"] for body in state.bodies]
    first_step_1 = next(i for i, text in enumerate(sent) if text.endswith("step 1"))
    assert sent[first_step_1] == "chain 0 step 1"
    # When the first second step arrived, the held first steps of chains 1-3 were still running.
    assert held <= set(state.running_at_arrival[first_step_1])
    assert time.monotonic() - started < HOLD_TIMEOUT_S  # no request waited for the timeout


def test_live_session_stops_on_a_permanent_failure_and_keeps_what_finished(server: tuple[str, FakeServerState]) -> None:
    from matrix_assets.llm.base import Job

    base_url, state = server
    state.fail_after = 5
    queue = [Job(i, [{"role": "user", "content": f"q{i}"}], GenerationParams()) for i in range(12)]
    done: list[int] = []
    with _backend(base_url, max_concurrency=2, max_retries=0) as backend, pytest.raises(BackendError, match="HTTP 500"):
        backend.serve(lambda n: [queue.pop(0) for _ in range(min(n or len(queue), len(queue)))],
                      lambda job, completion: done.append(job.id))
    assert len(done) == 5
    assert state.chat_requests <= 5 + 2  # stopped taking new jobs once a request failed


def test_next_token_logprobs_sum_the_spellings_of_each_candidate(server: tuple[str, FakeServerState]) -> None:
    import math

    base_url, state = server
    with _backend(base_url) as backend:
        scores = backend.next_token_logprobs(_conversations(3), ["yes", "no"])
    assert len(scores) == 3
    assert scores[0]["yes"] == pytest.approx(math.log(math.exp(-0.4) + math.exp(-2.0)))
    assert scores[0]["no"] == pytest.approx(-1.5)
    body = state.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert "continue_final_message" not in body


def test_next_token_logprobs_continue_an_assistant_prefix(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    with _backend(base_url) as backend:
        backend.next_token_logprobs(_conversations(1), ["1", "2"], assistant_prefix="Rating:")
    body = state.bodies[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Rating:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_a_server_without_logprobs_says_so_clearly(server: tuple[str, FakeServerState]) -> None:
    from matrix_assets.llm.base import LogprobsUnavailable

    base_url, state = server
    state.logprobs = False
    with _backend(base_url) as backend, pytest.raises(LogprobsUnavailable, match="returned no log-probabilities"):
        backend.next_token_logprobs(_conversations(2), ["yes", "no"])


def test_an_explicit_api_key_is_sent_and_never_shown(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    with _backend(base_url, api_key=SECRET) as backend:
        backend.generate(_conversations(1), GenerationParams(max_new_tokens=4))
        assert SECRET not in repr(backend)
    assert state.auth_headers == [f"Bearer {SECRET}"]


def test_json_schema_travels_as_response_format(server: tuple[str, FakeServerState]) -> None:
    base_url, state = server
    schema = json.dumps({"type": "object", "properties": {"steps": {"type": "array"}}}, sort_keys=True)
    with _backend(base_url) as backend:
        backend.generate(_conversations(1), GenerationParams(json_schema=schema))
        backend.generate(_conversations(1), GenerationParams())
    assert state.bodies[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "reply", "schema": json.loads(schema), "strict": True}}
    assert "response_format" not in state.bodies[1]
