"""Tuned evaluation through the serving engine: the OpenAI-compatible backend has the server load each checkpoint's
LoRA adapter by name (as vLLM does with --enable-lora) and never loads weights in this process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from http_helpers import JsonHandler

from matrix_assets.defs.resources import FakeLLM, MLflowResource, OpenAICompatibleLLM, StoreResource
from matrix_assets.llm.base import GenerationParams


class FakeVLLM:
    """A vLLM-like server: base model "base-model", adapters loaded at run time, answers naming the model used."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.load_requests: list[dict[str, Any]] = []
        self.models_used: list[str] = []
        self.lock = threading.Lock()


def _handler(state: FakeVLLM) -> type[JsonHandler]:
    class Handler(JsonHandler):
        def do_GET(self) -> None:
            self.send_json(200, {"data": [{"id": "base-model"}, *({"id": n} for n in state.loaded)]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            if self.path == "/v1/load_lora_adapter":
                with state.lock:
                    state.load_requests.append(body)
                    if body["lora_name"] in state.loaded:
                        self.send_json(400, {"message": f"The lora adapter '{body['lora_name']}' has already been "
                                                        "loaded."})
                        return
                    state.loaded[body["lora_name"]] = body["lora_path"]
                self.send_json(200, {"message": "Success"})
                return
            model = body["model"]
            if model != "base-model" and model not in state.loaded:
                self.send_json(404, {"error": f"model {model} does not exist"})
                return
            with state.lock:
                state.models_used.append(model)
            user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": f"{model} says: {user[:40]}"}}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [{"token": "yes", "logprob": -0.5,
                                                   "top_logprobs": [{"token": "yes", "logprob": -0.5},
                                                                    {"token": "no", "logprob": -1.0}]}]}
            self.send_json(200, {"choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 5}})

    return Handler


@pytest.fixture()
def vllm() -> Iterator[tuple[str, FakeVLLM]]:
    state = FakeVLLM()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    finally:
        server.shutdown()
        server.server_close()


def _adapter(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder


@pytest.fixture()
def no_local_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from matrix_assets.llm import transformers_backend

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded in the orchestrator")

    monkeypatch.setattr(transformers_backend.TransformersBackend, "__init__", refuse)


def test_a_checkpoint_is_loaded_on_the_server_once_and_asked_for_by_name(
    vllm: tuple[str, FakeVLLM], tmp_path: Path, no_local_weights: None,
) -> None:
    url, state = vllm
    llm = OpenAICompatibleLLM(base_url=url, model="base-model", api_key_env=None, serve_adapters=True)
    adapter = _adapter(tmp_path / "ckpt-a" / "adapter", b"weights-a")
    tuned = llm.backend(str(adapter))
    again = llm.backend(str(adapter))
    assert tuned is again and len(state.load_requests) == 1
    name = state.load_requests[0]["lora_name"]
    assert name.startswith("matrix-") and state.load_requests[0]["lora_path"] == str(adapter)
    out = tuned.generate([[{"role": "user", "content": "hello"}]], GenerationParams(max_new_tokens=8))
    assert out[0].text.startswith(f"{name} says")
    assert tuned.model_id.startswith(llm.model_identity() + "+lora:")
    base = llm.backend()
    assert base.model_id == llm.model_identity() and base.model_id != tuned.model_id
    other = llm.backend(str(_adapter(tmp_path / "ckpt-b" / "adapter", b"weights-b")))
    assert other.model_id != tuned.model_id and len(state.loaded) == 2


def test_the_server_path_of_a_shared_checkpoints_folder(vllm: tuple[str, FakeVLLM], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = vllm
    monkeypatch.setenv("MATRIX_HOME", str(tmp_path))
    adapter = _adapter(tmp_path / "checkpoints" / "ckpt-a" / "adapter", b"w")
    llm = OpenAICompatibleLLM(base_url=url, model="base-model", api_key_env=None, serve_adapters=True,
                              adapter_path_on_server="/mnt/shared/checkpoints")
    llm.backend(str(adapter))
    assert state.load_requests[-1]["lora_path"] == "/mnt/shared/checkpoints/ckpt-a/adapter"


def test_evaluation_of_served_checkpoints_loads_no_weights_here(
    vllm: tuple[str, FakeVLLM], matrix_home: Path, no_local_weights: None,
) -> None:
    from pipeline_helpers import all_assets, stage_config

    url, state = vllm
    store = StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}")
    db = store.get_store()
    for method in ("matrix", "refusal_template"):
        adapter = _adapter(matrix_home / "checkpoints" / f"ckpt-{method}" / "adapter", method.encode())
        db.save_checkpoint({"checkpoint_id": f"ckpt-{method}", "base_model": "base-model", "dataset_id": "d",
                            "method": method, "adapter_path": str(adapter), "n_examples": 1,
                            "created_at": "2026-01-01T00:00:00", "built_at": "2026-01-01T00:00:00"})
    served = OpenAICompatibleLLM(base_url=url, model="base-model", api_key_env=None, serve_adapters=True)
    resources = {"store": store, "llm": served, "judge": FakeLLM(),
                 "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}",
                                                   artifact_root=str(matrix_home / "mlartifacts"))}
    result = dg.materialize(all_assets(), selection=["evaluation_scores"], resources=resources,
                            instance=dg.DagsterInstance.ephemeral(),
                            run_config=stage_config(evaluation_scores={
                                "harmful_sets": ["safe_rlhf"], "safe_sets": ["xstest_safe"],
                                "helpfulness_sets": ["vicuna_bench"], "max_harmful_per_set": 2,
                                "max_safe_per_set": 2, "max_helpfulness_per_set": 2}))
    assert result.success
    names = {r["lora_name"] for r in state.load_requests}
    assert len(names) == 2 and names <= set(state.models_used) and "base-model" in state.models_used
    labels = {r["model_label"] for r in db.query("SELECT DISTINCT model_label FROM eval_answers")}
    assert labels == {"base", "matrix", "refusal_template"}
