"""The two web UIs, driven the way a user drives them: the Dagster webserver (`dagster dev`, as in scripts/ui.sh)
and the MLflow tracking server, each started as a real process on a free loopback port, looked at in headless
Chromium (Playwright), and the Dagster one also driven through its GraphQL API.

Needs Debian's chromium at /usr/bin/chromium (`bash scripts/system_deps.sh`); skipped without it. Runs on the
deterministic fake backend, with a tiny 2-layer Llama for LoRA training, so it never loads the real model.
The screenshots it takes are the ones in docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from http_helpers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"
VIEWPORT = {"width": 1600, "height": 1000}


def _graph_assets() -> list[tuple[str, str]]:
    """Every asset of the graph (the shared prompt stages, each registered method's stages, training set and
    checkpoint, the evaluation) as the UI shows it: (its group, the last part of its key). A method's assets are
    `METHOD/...` in group METHOD, so the pair names the asset."""
    import dagster as dg
    from pipeline_helpers import all_assets

    groups = {key: group for a in all_assets() if isinstance(a, dg.AssetsDefinition)
              for key, group in a.group_names_by_key.items()}
    assert all(len(key.path) == 1 or key.path[0] == group for key, group in groups.items()), groups
    return sorted((group, key.path[-1]) for key, group in groups.items())

PARTITION = "safe_rlhf"  # materialized through the webserver (test_materialize_a_partition_through_graphql)
PREP_PARTITION = "dangerousqa"  # materialized in-process before the servers start, to train two checkpoints
# Four checkpoints, so that the evaluation's table has as many columns as a real run's (base + each method).
TRAIN_METHODS = ["matrix", "cai", "initial_sft", "refusal_template"]
READY_TIMEOUT_S = 120
RUN_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: run `bash scripts/system_deps.sh`"),
    pytest.mark.timeout(420),
]


def _bin(name: str) -> str:
    """A console script of this virtual environment (dagster, mlflow)."""
    for candidate in (Path(sys.executable).parent / name, REPO / ".venv" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


# -- state: two checkpoints trained the real way, before any server starts -------------------------------------


def _prepare_state(home: Path, dagster_home: Path, tiny_model_dir: str) -> None:
    """Simulate PREP_PARTITION and train one LoRA checkpoint per TRAIN_METHODS, in this process, on the fake
    backend + tiny model, into the same stores (matrix.db, mlflow.db, Dagster storage) the servers will read."""
    import dagster as dg
    from pipeline_helpers import all_assets, quick_data_config, stage_config

    from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource
    from matrix_assets.methods import registry

    resources = {
        "store": StoreResource(database_url=f"sqlite:///{home / 'matrix.db'}"),
        "llm": FakeLLM(tiny_model_path=tiny_model_dir),
        "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(
            tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "mlartifacts")
        ),
    }
    per_prompt = [dg.AssetKey("benchmark_prompts"), dg.AssetKey("initial_responses"),
                  *[dg.AssetKey([m, stage.name]) for m in TRAIN_METHODS for stage in registry()[m].stages]]
    training = [dg.AssetKey([m, leaf]) for m in TRAIN_METHODS for leaf in ("training_set", "checkpoint")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MATRIX_HOME", str(home))  # checkpoints/ and datasets/ go under it
        mp.setenv("MATRIX_DAGSTER_STORAGE", str(home / "dagster"))  # read by dagster.yaml
        for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_DROP_DIR", "MATRIX_MLFLOW_ARTIFACTS"):
            mp.delenv(var, raising=False)
        # The servers' own Dagster instance, so that the UI shows these materializations too.
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        try:
            instance.add_dynamic_partitions("prompt_sets", [PREP_PARTITION])
            ops = quick_data_config(2, max_rounds=1)["ops"]  # the selected stages' config only
            simulated = dg.materialize(
                all_assets(), selection=per_prompt, partition_key=PREP_PARTITION, resources=resources,
                instance=instance, run_config={"ops": {op: config for op, config in ops.items()
                                                       if op.split("__")[0] in ("initial_responses", *TRAIN_METHODS)}},
            )
            assert simulated.success
            trained = dg.materialize(
                all_assets(), selection=training, resources=resources, instance=instance,
                run_config=stage_config(**{
                    **{f"{m}__training_set": {"prompt_sets": [PREP_PARTITION], "benign_ratio": 0.5}
                       for m in TRAIN_METHODS},
                    **{f"{m}__checkpoint": {"max_steps": 2, "batch_size": 2} for m in TRAIN_METHODS},
                }),
            )
            assert trained.success
        finally:
            instance.dispose()


# -- servers -------------------------------------------------------------------------------------------------


@dataclass
class UI:
    home: Path
    dagster_url: str
    mlflow_url: str
    checkpoint_ids: list[str]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: dagster dev spawns a code server, webserver, daemon
        )


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(procs: list[subprocess.Popen], timeout_s: float = 20) -> None:
    """SIGTERM to each whole process group, SIGKILL to whatever is left of them after `timeout_s`."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:  # also the grandchildren (code server, run workers, MLflow's job consumers)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _dagster_ready(url: str) -> bool:
    """The webserver answers and the code location is loaded."""
    query = "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name } } } }"
    data = httpx.post(f"{url}/graphql", json={"query": query}, timeout=10).json()["data"]["repositoriesOrError"]
    return data["__typename"] == "RepositoryConnection" and bool(data["nodes"])


def _mlflow_ready(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=10).status_code == 200


def _wait_ready(checks: dict[str, tuple], deadline_s: float) -> None:
    """Poll each server until its check passes; fail with the log tail of any that died or never came up."""
    pending = dict(checks)
    deadline = time.monotonic() + deadline_s
    while pending:
        for name, (proc, check, url, log) in list(pending.items()):
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with code {proc.returncode} before it was ready:\n{_tail(log)}")
            try:
                if check(url):
                    del pending[name]
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass
        if pending and time.monotonic() > deadline:
            name, (_, _, url, log) = next(iter(pending.items()))
            pytest.fail(f"{name} not ready at {url} after {deadline_s:.0f}s:\n{_tail(log)}")
        if pending:
            time.sleep(1)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str) -> Iterator[UI]:
    home = tmp_path_factory.mktemp("ui_matrix_home")
    # A DAGSTER_HOME of its own holding the repository's dagster.yaml: the instance config under test, while the
    # files `dagster dev` writes next to it (.nux/, logs/, .logs_queue/, compute logs in storage/) stay out of
    # the repository.
    dagster_home = home / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    (home / "mlartifacts").mkdir()

    _prepare_state(home, dagster_home, tiny_model_dir)
    from matrix_assets.store.db import Store

    checkpoint_ids = [r["checkpoint_id"] for r in
                      Store(f"sqlite:///{home / 'matrix.db'}").query("SELECT checkpoint_id FROM checkpoints")]
    assert len(checkpoint_ids) == len(TRAIN_METHODS)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATRIX_", "MLFLOW_", "DAGSTER_"))}
    env.update({
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
    })
    # Both servers on ports other than the defaults (3000, 5000), as on a busy machine; the one MLflow URL setting
    # tells Dagster's materializations where MLflow serves, as scripts/ui.sh does.
    dagster_port = free_port()
    mlflow_port = free_port()
    while mlflow_port == dagster_port:
        mlflow_port = free_port()
    dagster_env = dict(
        env, DAGSTER_HOME=str(dagster_home), MATRIX_HOME=str(home), MATRIX_DAGSTER_STORAGE=str(home / "dagster"),
        MATRIX_LLM_BACKEND="fake", MATRIX_TINY_MODEL=tiny_model_dir,
        MATRIX_MLFLOW_UI_URL=f"http://127.0.0.1:{mlflow_port}",
    )
    dagster_log, mlflow_log = home / "dagster.log", home / "mlflow.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(
            [_bin("dagster"), "dev", "-h", "127.0.0.1", "-p", str(dagster_port), "-w", "workspace.yaml"],
            dagster_env, dagster_log,
        ))
        procs.append(_start(
            [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
             "--default-artifact-root", str(home / "mlartifacts")],
            env, mlflow_log,
        ))
        dagster_url, mlflow_url = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
        _wait_ready({
            "dagster dev": (procs[0], _dagster_ready, dagster_url, dagster_log),
            "mlflow server": (procs[1], _mlflow_ready, mlflow_url, mlflow_log),
        }, READY_TIMEOUT_S)
        yield UI(home=home, dagster_url=dagster_url, mlflow_url=mlflow_url, checkpoint_ids=checkpoint_ids)
    finally:
        _stop(procs)


# -- browser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator:  # noqa: ANN001
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def _screenshot(page, name: str) -> Path:  # noqa: ANN001
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


# -- Dagster -------------------------------------------------------------------------------------------------


def _gql(ui: UI, query: str, **variables: object) -> dict:
    response = httpx.post(f"{ui.dagster_url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


REPOSITORIES = """
query { repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } } } }
"""
ADD_PARTITION = """
mutation AddPartition($repo: RepositorySelector!, $def: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $repo, partitionsDefName: $def, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionsDefName partitionKey }
    ... on DuplicateDynamicPartitionError { partitionName }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""
LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PipelineNotFoundError { message }
  }
}
"""
RUN_STATUS = """
query RunStatus($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status tags { key value } } } }
"""
RUN_ERRORS = """
query RunErrors($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message } ... on ErrorEvent { error { message } } } }
  }
}
"""


def _run_errors(ui: UI, run_id: str) -> str:
    try:
        events = _gql(ui, RUN_ERRORS, runId=run_id)["logsForRun"]["events"]
    except Exception as exc:  # noqa: BLE001 - only for the failure message
        return f"(could not read the run's events: {exc})"
    lines = [(e.get("error") or {}).get("message") or e.get("message") for e in events
             if e["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent", "EngineEvent")]
    return "\n".join(line for line in lines if line)[-4000:]


def test_materialize_a_partition_through_graphql(ui: UI) -> None:
    """Add a prompt-set partition and launch `simulate_prompt_set` on it through the webserver's GraphQL API, as
    the UI's launchpad does; the run goes through the queued run coordinator and daemon of `dagster dev`."""
    from pipeline_helpers import quick_data_config

    repos = _gql(ui, REPOSITORIES)["repositoriesOrError"]
    assert repos["__typename"] == "RepositoryConnection", repos
    [repo] = repos["nodes"]
    selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}

    added = _gql(ui, ADD_PARTITION, repo=selector, key=PARTITION, **{"def": "prompt_sets"})["addDynamicPartition"]
    assert added == {"__typename": "AddDynamicPartitionSuccess", "partitionsDefName": "prompt_sets",
                     "partitionKey": PARTITION}, added

    params = {
        "selector": {**selector, "jobName": "simulate_prompt_set"},
        # As edited in the Launchpad: every stage that selects prompts limited to 3, scenes of one round.
        "runConfigData": quick_data_config(3, max_rounds=1),
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": PARTITION}]},
    }
    launched = _gql(ui, LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = _gql(ui, RUN_STATUS, runId=run_id)["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run["status"] == "SUCCESS", f"run {run_id} is {run['status']}:\n{_run_errors(ui, run_id)}"
    assert {"key": "dagster/partition", "value": PARTITION} in run["tags"]

    from matrix_assets.store.db import Store

    db = Store(f"sqlite:///{ui.home / 'matrix.db'}")
    per_set = {r["prompt_set"]: r["n"] for r in db.query(
        "SELECT p.prompt_set, COUNT(*) AS n FROM transcripts t JOIN prompts p ON p.prompt_id = t.prompt_id "
        "GROUP BY p.prompt_set")}
    assert per_set.get(PARTITION) == 3, per_set
    rounds = db.query("SELECT t.n_rounds FROM transcripts t JOIN prompts p ON p.prompt_id = t.prompt_id "
                      "WHERE p.prompt_set = :s", s=PARTITION)
    assert all(r["n_rounds"] <= 1 for r in rounds), rounds  # the run config reached the asset


def _dismiss_popups(ui: UI, page) -> None:  # noqa: ANN001
    """Close Dagster's one-time "Join the Dagster community" dialog, which covers the page on a first visit.
    Whether it will come is asked first (GraphQL `shouldShowNux`), so that a slow page cannot outrun the check."""
    if not _gql(ui, "{ shouldShowNux }")["shouldShowNux"]:
        return
    skip = page.get_by_role("button", name="Skip", exact=True)
    skip.wait_for(state="visible")
    skip.click()
    skip.wait_for(state="hidden")
    # The page hides the dialog before its "seen" mutation reaches the server: wait for the server to record it.
    deadline = time.monotonic() + 15
    while _gql(ui, "{ shouldShowNux }")["shouldShowNux"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gql(ui, "{ shouldShowNux }")["shouldShowNux"] is False


def _graph_label_matches(label: str, name: str) -> bool:
    """The zoomed-out graph shortens long names in the middle ("benchm…_prompts")."""
    if "…" not in label:
        return label == name
    head, tail = label.split("…", 1)
    return name.startswith(head) and name.endswith(tail)


# Each asset node of the graph as (the group box it lies in, its label): the nodes carry only the last part of the
# key, the group boxes their names.
GRAPH_NODES_JS = """() => {
  const groups = [...document.querySelectorAll("foreignObject.group")].map(g => ({
    name: g.querySelector("[data-tooltip]") && g.querySelector("[data-tooltip]").getAttribute("data-tooltip"),
    x: +g.getAttribute("x"), y: +g.getAttribute("y"), w: +g.getAttribute("width"), h: +g.getAttribute("height")}));
  return [...document.querySelectorAll("foreignObject:not(.group)")]
    .filter(n => n.querySelector("[class*='assetName']"))
    .map(n => {
      const x = +n.getAttribute("x"), y = +n.getAttribute("y");
      const g = groups.find(g => x >= g.x && x < g.x + g.w && y >= g.y && y < g.y + g.h);
      return [g ? g.name : null, n.querySelector("[class*='assetName']").innerText.trim()];
    });
}"""
# The sidebar tree's rendered rows (it is virtualized): [index, is a group row, full name].
SIDEBAR_ROWS_JS = """() => [...document.querySelectorAll("[data-index]")].map(r => [
  Number(r.getAttribute("data-index")), !!r.querySelector("[aria-label='asset_group']"),
  r.querySelector("[title]") ? r.querySelector("[title]").getAttribute("title") : null])"""
SCROLL_SIDEBAR_JS = """() => {
  let el = document.querySelector("[data-index]");
  while (el && !(el.scrollHeight > el.clientHeight + 1 && /(auto|scroll)/.test(getComputedStyle(el).overflowY))) {
    el = el.parentElement;
  }
  if (el) { el.scrollTop += el.clientHeight; }
}"""


def _sidebar_assets(page) -> list[tuple[str, str]]:  # noqa: ANN001
    """(group, asset) for every asset row of the sidebar tree, scrolling through it."""
    rows: dict[int, tuple[bool, str]] = {}
    for _ in range(20):
        found = {index: (is_group, title) for index, is_group, title in page.evaluate(SIDEBAR_ROWS_JS)}
        if set(found) <= set(rows):
            break
        rows.update(found)
        page.evaluate(SCROLL_SIDEBAR_JS)
        page.wait_for_timeout(300)
    pairs, group = [], None
    for index in sorted(rows):
        is_group, title = rows[index]
        if is_group:
            group = title
        else:
            pairs.append((group, title))
    return sorted(pairs)


def test_dagster_asset_graph_shows_every_asset(ui: UI, page) -> None:  # noqa: ANN001
    assets = _graph_assets()
    page.goto(f"{ui.dagster_url}/asset-groups")
    _dismiss_popups(ui, page)
    page.get_by_text("Global asset lineage").first.wait_for()
    page.get_by_role("button", name="zoom_in", exact=True).wait_for()  # the graph viewport is up

    # Groups start collapsed in the global graph: expand them all (the graph's ⌥E shortcut, else its menu).
    node_labels = "foreignObject [class*='assetName']"
    enough_nodes = f"n => document.querySelectorAll(\"{node_labels}\").length >= n"
    page.keyboard.press("Alt+e")
    try:
        page.wait_for_function(enough_nodes, arg=len(assets), timeout=5000)
    except Exception:  # noqa: BLE001 - shortcut not taken: use the settings menu
        page.get_by_role("button", name="settings", exact=True).click()
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
        page.wait_for_function(enough_nodes, arg=len(assets))
    # Every asset is a node in its group's box, and there is no other node.
    nodes = page.evaluate(GRAPH_NODES_JS)
    assert len(nodes) == len(assets), (nodes, assets)
    for group, name in assets:
        assert any(g == group and _graph_label_matches(label, name) for g, label in nodes), (group, name, nodes)

    # The sidebar tree lists the full names under their groups: expand every group there too.
    collapsed = page.locator("button:has([aria-label='arrow_drop_down'][style*='rotate(-90deg)'])")
    for _ in range(20):
        if collapsed.count() == 0:
            break
        collapsed.first.click()
    page.locator("[data-index] [aria-label='asset_group']").first.wait_for(state="visible")
    assert _sidebar_assets(page) == assets

    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    # After expanding, the groups are wider than the view: one step out fits the whole graph in the picture.
    page.get_by_role("button", name="zoom_out", exact=True).click()
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 50)  # no hover tooltip in the picture
    page.wait_for_timeout(1500)  # the graph animates into place
    _screenshot(page, "dagster_asset_graph.png")


# -- MLflow --------------------------------------------------------------------------------------------------


def _close_mlflow_assistant(page) -> None:  # noqa: ANN001
    """MLflow 3 opens its "MLflow Assistant" side panel on a first visit; it covers a third of the page."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    try:
        close.wait_for(state="visible", timeout=3000)
    except Exception:  # noqa: BLE001 - not open this time
        return
    close.click()
    close.wait_for(state="hidden")


def _autosize_columns(page) -> None:  # noqa: ANN001
    """Double-clicking an ag-grid header's resize handle fits the column to its content."""
    for handle in page.locator("[role=columnheader] .ag-header-cell-resize").all():
        if handle.is_visible():
            handle.dblclick()


def test_mlflow_ui_lists_every_checkpoint_run(ui: UI, page) -> None:  # noqa: ANN001
    from matrix_assets.methods import registry

    experiment = httpx.get(f"{ui.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": "matrix-assets"}, timeout=30).json()["experiment"]
    assert all(c.startswith("ckpt-") for c in ui.checkpoint_ids), ui.checkpoint_ids

    # MLflow 3 opens an experiment on its GenAI overview; the training runs are under "Model training".
    page.goto(f"{ui.mlflow_url}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning")
    for checkpoint_id in ui.checkpoint_ids:  # run name == checkpoint id
        page.get_by_text(checkpoint_id, exact=True).first.wait_for(state="visible")
    page.get_by_text(f"{len(ui.checkpoint_ids)} matching runs").wait_for(state="visible")
    _close_mlflow_assistant(page)

    # For the picture: the training loss, method and Dagster asset instead of the empty Dataset / Models columns.
    page.get_by_role("button", name="Columns", exact=True).click()
    selector = page.locator("[data-component-id='mlflow.experiment_page.runs_table.column_selector']")
    for column in ("Dataset", "Models", "train_loss", "method", "dagster.asset_key"):
        selector.get_by_text(column, exact=True).first.click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name="train_loss").first.wait_for(state="visible")
    _autosize_columns(page)
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 50)
    page.wait_for_timeout(1000)
    _screenshot(page, "mlflow_runs.png")

    # Each version says what it is, and each method's latest is found by its alias, whatever the training order.
    for method in TRAIN_METHODS:
        version = httpx.get(f"{ui.mlflow_url}/api/2.0/mlflow/registered-models/alias", timeout=30, params={
            "name": "matrix-aligned", "alias": method}).json()["model_version"]
        assert {t["key"]: t["value"] for t in version["tags"]}["method"] == method
        assert version["description"].startswith(registry()[method].title) and "dataset" in version["description"]

    page.goto(f"{ui.mlflow_url}/#/models/matrix-aligned?workflowType=machine_learning")
    _close_mlflow_assistant(page)
    for version in range(1, len(ui.checkpoint_ids) + 1):
        page.get_by_text(f"Version {version}", exact=True).first.wait_for(state="visible")
    for checkpoint_id in ui.checkpoint_ids:  # each version is tagged with its checkpoint
        assert page.get_by_text(checkpoint_id).count() == 1, checkpoint_id
    page.wait_for_timeout(1000)
    _screenshot(page, "mlflow_models.png")


# -- prompt sets dropped by role, and the evaluation as a user looks at it -------------------------------------

RUNS_OF_PARTITION = """
query Runs($partition: String!) {
  runsOrError(filter: {tags: [{key: "dagster/partition", value: $partition}]}) {
    __typename ... on Runs { results { runId pipelineName status } }
  }
}
"""
LATEST_MATERIALIZATION = """
query Latest($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { label __typename
      ... on UrlMetadataEntry { url } ... on TextMetadataEntry { text } ... on FloatMetadataEntry { floatValue } } } }
  }
}
"""


def _wait_for_run(ui: UI, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = _gql(ui, RUN_STATUS, runId=run_id)["runOrError"]
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED") or time.monotonic() > deadline:
            return run
        time.sleep(2)


def test_a_helpfulness_file_dropped_in_its_folder_launches_no_training_run(ui: UI) -> None:
    """MT-Bench's question file (its format: question_id, category, turns) dropped into drop/helpfulness/ while
    `dagster dev` runs: the sensor registers it for evaluation; nothing is simulated or trained from it."""
    import json

    folder = ui.home / "drop" / "helpfulness"
    folder.mkdir(parents=True, exist_ok=True)
    questions = ["Compose an engaging travel blog post about a recent trip to Hawaii.",
                 "Draft a professional email seeking your supervisor's feedback on a quarterly report.",
                 "Write a Python function that returns the n-th Fibonacci number.",
                 "Explain the difference between weather and climate to a ten-year-old."]
    (folder / "question.jsonl").write_text("".join(
        json.dumps({"question_id": 81 + i, "category": "writing", "turns": [q, "Now make it shorter."]}) + "\n"
        for i, q in enumerate(questions)), encoding="utf-8")

    deadline = time.monotonic() + RUN_TIMEOUT_S  # the sensor ticks every 30 s
    runs: list[dict] = []
    while not runs and time.monotonic() < deadline:
        time.sleep(3)
        runs = _gql(ui, RUNS_OF_PARTITION, partition="question")["runsOrError"]["results"]
    assert runs, "the sensor launched no run for the dropped file"
    [run] = runs
    assert run["pipelineName"] == "register_prompt_set", runs  # not simulate_prompt_set
    finished = _wait_for_run(ui, run["runId"])
    assert finished["status"] == "SUCCESS", _run_errors(ui, run["runId"])

    from matrix_assets.store.db import Store

    db = Store(f"sqlite:///{ui.home / 'matrix.db'}")
    assert db.prompt_set_role("question") == "helpfulness"
    assert db.train_prompts("question") == [] and len(db.prompts("question", split="eval")) == len(questions)
    assert db.training_data_counts("question") == {}  # no answers, scenes or training groups made from it
    assert [r["pipelineName"] for r in _gql(ui, RUNS_OF_PARTITION, partition="question")["runsOrError"]["results"]
            ] == ["register_prompt_set"]


@pytest.fixture(scope="module")
def evaluation_run(ui: UI) -> dict:
    """evaluation_scores materialized through the webserver as its Materialize button does (the asset job with
    an asset selection): base and every trained checkpoint on a few held-out prompts of each kind. Returns the
    materialization's metadata by label."""
    from pipeline_helpers import stage_config

    [repo] = _gql(ui, REPOSITORIES)["repositoriesOrError"]["nodes"]
    selector = {"repositoryName": repo["name"], "repositoryLocationName": repo["location"]["name"]}
    params = {
        "selector": {**selector, "jobName": "__ASSET_JOB", "assetSelection": [{"path": ["evaluation_scores"]}]},
        "runConfigData": stage_config(evaluation_scores={
            "harmful_sets": [PREP_PARTITION], "safe_sets": ["xstest_safe"], "helpfulness_sets": ["vicuna_bench"],
            "max_harmful_per_set": 4, "max_safe_per_set": 4, "max_helpfulness_per_set": 4,
            "pairwise_helpfulness": False, "methods": TRAIN_METHODS}),
    }
    launched = _gql(ui, LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    assert _wait_for_run(ui, run_id)["status"] == "SUCCESS", _run_errors(ui, run_id)
    asset = _gql(ui, LATEST_MATERIALIZATION, key={"path": ["evaluation_scores"]})["assetOrError"]
    [materialization] = asset["assetMaterializations"]
    assert materialization["runId"] == run_id
    return {e["label"]: e for e in materialization["metadataEntries"]}


def _open_evaluation_asset(ui: UI, page) -> None:  # noqa: ANN001
    page.goto(f"{ui.dagster_url}/assets/evaluation_scores")
    _dismiss_popups(ui, page)
    page.get_by_role("button", name="Plots").wait_for(state="visible")


def test_evaluation_plots_tab_lists_a_harmful_compliance_series(ui: UI, evaluation_run: dict, page) -> None:  # noqa: ANN001
    for method in ("base", *TRAIN_METHODS):  # numbers, not text: the Plots tab can draw them
        assert evaluation_run[f"harmful_compliance/{method}"]["__typename"] == "FloatMetadataEntry", method
    assert evaluation_run["harmful_compliance_vs_base/matrix"]["__typename"] == "FloatMetadataEntry"
    _open_evaluation_asset(ui, page)
    page.get_by_role("button", name="Plots").click()
    for method in ("base", "matrix"):
        page.get_by_text(f"harmful_compliance/{method}", exact=True).first.wait_for(state="visible")
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 50)
    page.wait_for_timeout(1000)
    _screenshot(page, "dagster_evaluation_plots.png")


def test_evaluation_table_is_fully_visible_in_its_dialog(ui: UI, evaluation_run: dict, page) -> None:  # noqa: ANN001
    _open_evaluation_asset(ui, page)
    row = page.locator("tr", has=page.get_by_text("table", exact=True))
    row.get_by_text("[Show Markdown]").click()
    dialog = page.locator(".bp5-dialog")
    dialog.locator("table").first.wait_for(state="visible")
    fit = dialog.evaluate("""d => {
      const body = d.querySelector('.bp5-dialog-body') || d;
      const box = d.getBoundingClientRect();
      const cells = [...d.querySelectorAll('table td, table th')];
      return {tables: d.querySelectorAll('table').length, pre: d.querySelectorAll('pre').length,
              overflow: body.scrollWidth - body.clientWidth,
              outside: cells.filter(c => c.getBoundingClientRect().right > box.right + 0.5).length,
              text: d.innerText};
    }""")
    assert fit["tables"] == 1 and fit["pre"] == 0, fit  # a table, not a fixed-width text block
    assert fit["overflow"] <= 0 and fit["outside"] == 0, fit  # no cell cut off, no sideways scrolling
    for method in TRAIN_METHODS:
        assert method in fit["text"]
    assert "Exploratory evaluation" in fit["text"]  # 4 prompts a set: never shown as the headline
    page.wait_for_timeout(1000)  # the dialog fades in
    _screenshot(page, "dagster_evaluation_table.png")


def test_the_mlflow_link_of_a_run_on_non_default_ports_opens_that_run(ui: UI, evaluation_run: dict, page) -> None:  # noqa: ANN001
    url = evaluation_run["mlflow_run"]["url"]
    assert url.startswith(f"{ui.mlflow_url}/#/experiments/"), (url, ui.mlflow_url)  # not port 5000
    run_id = url.split("/runs/", 1)[1].split("?", 1)[0]
    run = httpx.get(f"{ui.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30).json()["run"]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {f"harmful_compliance/{m}" for m in ("base", *TRAIN_METHODS)} <= metrics  # the parent run charts them
    nested = httpx.post(f"{ui.mlflow_url}/api/2.0/mlflow/runs/search", timeout=30, json={
        "experiment_ids": [run["info"]["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{run_id}'"}).json()["runs"]
    assert len(nested) == len(TRAIN_METHODS) + 1
    for child in nested:
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["dagster.asset_key"] == "evaluation_scores" and tags["dagster.run_id"], tags

    page.goto(url)
    _close_mlflow_assistant(page)
    page.get_by_text(run["info"]["run_name"], exact=True).first.wait_for(state="visible")
    page.get_by_text("dagster.asset_key").first.wait_for(state="visible")
    page.wait_for_timeout(1000)
    _screenshot(page, "mlflow_evaluation_run.png")
