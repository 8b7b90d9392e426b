"""Dagster resources: the store, the LLM backends (one abstract resource, three implementations) and MLflow.

Heavy objects (a loaded model, a database engine) are built once per process and shared, keyed by the
resource's configuration, because Dagster re-instantiates resources for every step.
"""


import os
import re
import threading
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from matrix_assets.llm.base import BackendError, ChatBackend
from matrix_assets.llm.memory import release_memory
from matrix_assets.store.generation_cache import CachedBackend, ProgressCallback
from matrix_assets.llm.models import DEFAULT_MODEL, check_model_available, resolve_model_path
from matrix_assets.settings import default_artifact_root, default_mlflow_uri, mlflow_ui_url
from matrix_assets.store.db import Store, default_database_url

_SHARED: dict[tuple, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: tuple, build):  # noqa: ANN001, ANN202 - tiny process-wide memo
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = build()
        return _SHARED[key]


def release_models() -> int:
    """Free every model this process keeps (stores stay): for a long-lived process between jobs, and for the test
    suite between modules, which would otherwise hold every backend any test built."""
    with _SHARED_LOCK:
        keys = [key for key in _SHARED if key[0] not in ("store", "adapter-loaded")]  # those hold no weights
        for key in keys:
            del _SHARED[key]
    release_memory()
    return len(keys)


def _release(key: tuple) -> bool:
    """Forget a shared object and give its memory back now (a model's weights are hundreds of MB)."""
    with _SHARED_LOCK:
        found = _SHARED.pop(key, None) is not None
    if found:
        release_memory()
    return found


class StoreResource(dg.ConfigurableResource):
    """The project's SQL database (SQLite file by default, PostgreSQL in production)."""

    database_url: str = Field(default_factory=default_database_url, description="SQLAlchemy URL of the store.")

    def get_store(self) -> Store:
        return _shared(("store", self.database_url), lambda: Store(self.database_url))


class LLMResource(dg.ConfigurableResource):
    """A generation backend. Subclasses are swapped per deployment (local model, remote server, fake)."""

    batch_size: int = Field(default=32, ge=1, description="Conversations decoded at once (local CPU) or per cache chunk. "
                            "32: on a 2-core CPU the best for scene-length prompts, 1.14x the tokens/s of 16, where 64 "
                            "gained nothing for 1.5x the memory (benchmarks/results/batch_sizes.md).")

    @abstractmethod
    def backend(self, adapter_path: str | None = None) -> ChatBackend:
        """The raw backend; `adapter_path` stacks a LoRA adapter on the base model."""

    @abstractmethod
    def check(self) -> None:
        """Fail fast, before expensive work, if the backend cannot work (missing model, server down)."""

    @abstractmethod
    def model_identity(self) -> str:
        """The base model's `model_id`, known without loading it (records are keyed by it)."""

    def base_model_path(self) -> str:
        """A local folder with the base weights, for training. Remote backends cannot provide one."""
        raise BackendError(f"{type(self).__name__} has no local base model to fine-tune; use LocalTransformersLLM")

    def base_model_name(self) -> str:
        """The base model as `models.resolve_model_path` finds it on any machine with this package (the bundled
        alias, a hub id) or this one (a folder): what a registered checkpoint records to load itself."""
        return self.base_model_path()

    def release(self, adapter_path: str | None = None) -> None:
        """Free the loaded backend of this adapter (or of the base model), if this resource keeps one: an asset
        that answers with several checkpoints in turn holds one at a time, not all of them."""

    def cached(
        self, store: Store, adapter_path: str | None = None, progress: ProgressCallback | None = None
    ) -> CachedBackend:
        """The backend behind the generation cache; `progress(done, total)` is told about cache misses."""
        return CachedBackend(self.backend(adapter_path), store, chunk_size=self.batch_size, progress=progress)


class LocalTransformersLLM(LLMResource):
    """In-process transformers model: the bundled SmolLM2-135M-Instruct, a local folder or a cached hub id."""

    model: str = Field(default=DEFAULT_MODEL, description="Bundled alias, local folder, or Hugging Face id.")
    torch_threads: int | None = Field(default=None, description="torch intra-op threads (None: torch default).")
    device: str = Field(default="auto", description="auto: the first CUDA GPU when torch sees one (bf16, SDPA), "
                        "else the CPU (fp32); or cpu, cuda, cuda:1.")
    gpu_batch_size: int = Field(default=256, ge=1, description="Rows decoded together on a GPU (batch_size is the CPU's).")
    batch_tokens: int = Field(
        default=6400, ge=0,
        description="CPU: a known list of prompts (evaluation answers, initial and benign answers) is decoded in "
        "batches wider than batch_size while the rows' tokens (mean prompt + max new tokens each) fit this budget: "
        "short evaluation prompts then run ~60 at a time, 1.16x the tokens/s of 32 (benchmarks/results/"
        "batch_sizes.md); 0 keeps batch_size.")
    decoding: str = Field(
        default="refill",
        description="refill (default): a row leaves the batch the moment it ends and the next queued request "
        "takes its slot, so no step is spent on finished rows and the scenes never wait for each other (on a GPU "
        "it becomes static); static: padded batches on a static KV cache, compiled with CUDA graphs by transformers "
        "on a GPU; padded: one model.generate per length-sorted chunk; continuous: transformers' continuous "
        "batching (calls with a repetition penalty stay padded; on a 2-core CPU it was slower and took ~10.9 GB RSS).",
    )

    prepack_weights: bool = Field(
        default=True,
        description="On CPU, run the linear layers with oneDNN on weights packed once at load (about 2x faster "
        "batched decoding than torch's default kernel on the machines measured; a LoRA adapter is merged first).",
    )

    def _key(self, adapter_path: str | None) -> tuple:
        return ("transformers", self.model, adapter_path, self.batch_size, self.batch_tokens, self.gpu_batch_size, self.device,
                self.torch_threads, self.decoding, self.prepack_weights)

    def release(self, adapter_path: str | None = None) -> None:
        _release(self._key(adapter_path))

    def backend(self, adapter_path: str | None = None) -> ChatBackend:
        from matrix_assets.llm.transformers_backend import TransformersBackend

        return _shared(
            self._key(adapter_path),
            lambda: TransformersBackend(
                self.model, adapter_path=adapter_path, batch_size=self.batch_size, batch_tokens=self.batch_tokens or None,
                gpu_batch_size=self.gpu_batch_size,
                device=self.device, torch_threads=self.torch_threads, decoding=self.decoding,
                prepack_weights=self.prepack_weights,
            ),
        )

    def check(self) -> None:
        check_model_available(self.model)

    def model_identity(self) -> str:
        return self.model

    def base_model_name(self) -> str:
        return self.model

    def base_model_path(self) -> str:
        return resolve_model_path(self.model)


class OpenAICompatibleLLM(LLMResource):
    """A vLLM / TGI / llama.cpp server. The API key comes from the environment: `api_key=dg.EnvVar("NAME")`
    (resolved at launch, stored as the variable's name only), or the variable named by `api_key_env`."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="Model name as the server knows it.")
    api_key: str | None = Field(default=None, description="Set with dg.EnvVar(NAME): never a literal key.")
    api_key_env: str | None = Field(default="OPENAI_API_KEY",
                                    description="Environment variable with the key, when api_key is not set.")
    max_concurrency: int = Field(default=8, description="Requests in flight at once.")
    timeout_s: float = 60.0
    max_retries: int = 3
    local_model_for_training: str | None = Field(
        default=None, description="Local copy of the served weights, used for LoRA training (and for tuned "
        "evaluation when the server does not serve adapters)."
    )
    serve_adapters: bool = Field(
        default=False, description="The server loads each checkpoint's LoRA adapter by name at run time (vLLM "
        "--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): tuned evaluation then never loads weights here.")
    adapter_path_on_server: str | None = Field(
        default=None, description="Where the server sees this machine's checkpoints folder (e.g. a shared volume "
        "mounted elsewhere); None: the same path.")

    def backend(self, adapter_path: str | None = None) -> ChatBackend:
        if adapter_path and self.serve_adapters:
            return self._served_adapter(adapter_path)
        if adapter_path:
            if not self.local_model_for_training:
                raise BackendError("evaluating a LoRA adapter needs serve_adapters=True (the server loads it) or "
                                   "local_model_for_training (loaded here)")
            return LocalTransformersLLM(model=self.local_model_for_training, batch_size=self.batch_size).backend(
                adapter_path
            )
        return self._client_for(self.model)

    def release(self, adapter_path: str | None = None) -> None:
        if adapter_path and not self.serve_adapters and self.local_model_for_training:
            LocalTransformersLLM(model=self.local_model_for_training, batch_size=self.batch_size).release(adapter_path)

    def _served_adapter(self, adapter_path: str) -> ChatBackend:
        """The checkpoint as the server serves it: loaded there under a name derived from its content, and asked
        for by that name; its model id names the base model and the adapter, so the cache never mixes them."""
        from matrix_assets.settings import checkpoints_dir
        from matrix_assets.llm.transformers_backend import adapter_fingerprint

        fingerprint = adapter_fingerprint(adapter_path)
        name = f"matrix-{fingerprint}"
        path = adapter_path
        if self.adapter_path_on_server:
            path = adapter_path.replace(str(checkpoints_dir()), self.adapter_path_on_server.rstrip("/"), 1)
        backend = self._client_for(name)
        if ("adapter-loaded", self.base_url, name) not in _SHARED:
            backend.load_adapter(name, path)  # type: ignore[attr-defined]
            _SHARED[("adapter-loaded", self.base_url, name)] = True
        backend.model_id = f"{self.model_identity()}+lora:{fingerprint}"
        return backend

    def _client_for(self, model: str) -> ChatBackend:
        from matrix_assets.llm.openai_backend import OpenAICompatibleBackend

        backend = _shared(
            ("openai", self.base_url, model, self.api_key_env, self.api_key, self.max_concurrency,
             self.timeout_s, self.max_retries),
            lambda: OpenAICompatibleBackend(
                self.base_url, model, api_key_env=self.api_key_env, api_key=self.api_key,
                max_concurrency=self.max_concurrency, timeout_s=self.timeout_s, max_retries=self.max_retries,
            ),
        )
        # The base model's records are keyed by the resource's identity: a subclass may key them by the weights
        # rather than the URL (ManagedVLLM), and the cache must agree with the records.
        if model == self.model:
            backend.model_id = self.model_identity()
        return backend

    def check(self) -> None:
        self.backend().check_health()  # type: ignore[attr-defined]

    def model_identity(self) -> str:
        return f"openai:{self.model}@{self.base_url.rstrip('/')}"

    def base_model_path(self) -> str:
        if not self.local_model_for_training:
            return super().base_model_path()
        return resolve_model_path(self.local_model_for_training)


class ManagedVLLM(OpenAICompatibleLLM):
    """vLLM as a managed engine: when nothing answers at `base_url`, a server is started for the run (vLLM's CPU
    build on a CPU, from the venv of `scripts/install_vllm.sh`) and stopped when the run ends; when one answers,
    the run connects to it. Every checkpoint's adapter is served by name, and training uses the same weights
    locally. Records are keyed `vllm:MODEL` whatever the port, so a re-run on a fresh server reuses the cache."""

    base_url: str = Field(default="http://127.0.0.1:8011/v1", description="Where the server listens (started on "
                          "this port of 127.0.0.1 when nothing answers there).")
    model: str = Field(default=DEFAULT_MODEL, description="Weights to serve (bundled alias, local folder or hub "
                       "id), also the name they are served under.")
    api_key_env: str | None = Field(default=None, description="A started server needs no key.")
    serve_adapters: bool = Field(default=True, description="Checkpoints are loaded by the server, by name.")
    max_concurrency: int = Field(default=32, ge=1, description="Requests in flight at once (vLLM batches them).")
    vllm_python: str | None = Field(default=None, description="Interpreter with vLLM (None: .venv-vllm of this "
                                    "repository, or $MATRIX_VLLM_VENV).")
    kv_cache_gib: int = Field(default=2, ge=1, description="CPU build: KV cache size (VLLM_CPU_KVCACHE_SPACE).")
    max_model_len: int = Field(default=2048, ge=256, description="Longest prompt + answer the server accepts.")
    startup_timeout_s: float = Field(default=300.0, gt=0, description="Wait for /health at most this long.")
    _server: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from urllib.parse import urlparse

        from matrix_assets.llm.vllm_server import default_vllm_python, for_this_machine
        from matrix_assets.settings import matrix_home

        try:
            self._client_for(self.model).check_health()  # type: ignore[attr-defined]
            return  # a server answers already: connect, and leave it running
        except BackendError:
            pass
        port = urlparse(self.base_url).port or 8011
        server = for_this_machine(self.model, self.model, port, matrix_home() / "logs" / f"vllm-{port}.log",
                                  python=self.vllm_python or default_vllm_python(), kv_cache_gib=self.kv_cache_gib,
                                  max_model_len=self.max_model_len, startup_timeout_s=self.startup_timeout_s)
        if context.log:
            context.log.info(f"starting vLLM for this run: {' '.join(server.command())} (log {server.log_path})")
        server.start()
        self._server = server

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def model_identity(self) -> str:
        return f"vllm:{self.model}"

    def base_model_name(self) -> str:
        return self.model

    def base_model_path(self) -> str:
        return resolve_model_path(self.model)


class FakeLLM(LLMResource):
    """Deterministic fake for tests; `tiny_model_path` lets training run on a tiny real model."""

    garbage: bool = False
    tiny_model_path: str | None = None

    def backend(self, adapter_path: str | None = None) -> ChatBackend:
        from matrix_assets.llm.fake import FakeBackend

        model_id = "fake-llm" + (f"+lora:{os.path.basename(os.path.dirname(adapter_path))}" if adapter_path else "")
        return _shared(("fake", model_id, self.garbage), lambda: FakeBackend(model_id, garbage=self.garbage))

    def check(self) -> None:
        return None

    def model_identity(self) -> str:
        return "fake-llm"

    def base_model_path(self) -> str:
        if not self.tiny_model_path:
            return super().base_model_path()
        return self.tiny_model_path


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking: one run per training or evaluation materialization, tagged with Dagster ids."""

    tracking_uri: str = Field(default_factory=default_mlflow_uri)
    artifact_root: str = Field(default_factory=default_artifact_root)
    experiment_name: str = "matrix-assets"
    registered_model_name: str = "matrix-aligned"
    ui_url: str = Field(default_factory=mlflow_ui_url, description="Where the MLflow UI serves, for the links "
                        "on materializations (MATRIX_MLFLOW_UI_URL; scripts/ui.sh sets it to the port it starts).")

    def check(self) -> None:
        """Fail fast, before any training or evaluation work, if the tracking store cannot be used.

        An http(s) tracking URI must answer `GET {uri}/health` within a few seconds (MLflow's own client would
        retry an unreachable server for minutes, after the expensive work is done); a local store (`sqlite:///`
        file or a folder) and a local artifact root must be creatable. Other schemes are left to MLflow.
        Raises `TrackingUnavailableError` naming the URI (with any password masked).
        """
        uri = self.tracking_uri
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme in ("http", "https"):
            _check_tracking_server(uri)
        elif scheme == "sqlite":
            path = uri.split("///", 1)[1] if "///" in uri else ""
            if path and path != ":memory:":
                _check_local_dir(os.path.dirname(os.path.abspath(path)), f"MLflow tracking store {uri}")
        elif scheme in ("", "file"):
            _check_local_dir(uri[len("file://"):] if scheme else uri, f"MLflow tracking store {uri}")
        root = self.artifact_root
        if "://" not in root or root.startswith("file://"):
            _check_local_dir(root[len("file://"):] if root.startswith("file://") else root,
                             f"MLflow artifact root {root}")

    def client(self):  # noqa: ANN201
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.MlflowClient(self.tracking_uri)

    def experiment_id(self) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        experiment = mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        os.makedirs(self.artifact_root, exist_ok=True)
        return mlflow.create_experiment(self.experiment_name, artifact_location=_as_uri(self.artifact_root))

    @contextmanager
    def start_run(self, context: dg.AssetExecutionContext, run_name: str) -> Iterator[Any]:
        import mlflow

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        experiment_id = self.experiment_id()
        # Never leave a run active in the process, whatever happens inside.
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=self.dagster_tags(context)) as run:
            yield run

    @staticmethod
    def dagster_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
        """What links an MLflow run (a nested one too) back to the Dagster run, asset and partition."""
        return {
            "dagster.run_id": context.run.run_id,
            "dagster.asset_key": context.asset_key.to_user_string(),
            "dagster.partition": context.partition_key if context.has_partition_key else "",
        }

    def register_adapter(self, run_id: str, adapter_dir: Any, base_model: str, tags: dict[str, str], *,
                         description: str = "", alias: str | None = None) -> str:
        """Log the checkpoint as a loadable pyfunc model (base model identity + adapter) in the active run and
        register it as a version of `registered_model_name` with `description`; `alias` (the method's name) then
        points at it, so `models:/NAME@matrix` loads the latest MATRIX checkpoint whatever order methods were
        trained in. Returns the version as MLflow gives it."""
        import mlflow

        from matrix_assets.llm.pyfunc import log_adapter_model

        info = log_adapter_model(adapter_dir, base_model)
        client = self.client()  # also sets the tracking URI for the registry call below
        version = str(mlflow.register_model(info.model_uri, self.registered_model_name, tags=tags).version)
        if description:
            client.update_model_version(self.registered_model_name, version, description=description)
        if alias:
            client.set_registered_model_alias(self.registered_model_name, alias, version)
        if not client.get_registered_model(self.registered_model_name).description:
            client.update_registered_model(self.registered_model_name, description=(
                "LoRA adapters of matrix-assets, one version per trained checkpoint. Each method's latest has the "
                "method's name as alias (models:/NAME@matrix, @cai, ...); `champion` marks the checkpoint promoted "
                "on paired evidence. Versions are numbered in training order, not by method."))
        return version

    def run_url(self, run_id: str) -> str:
        """The run's page; in MLflow 3's "Model training" view, where training and evaluation runs are listed (its
        UI otherwise starts in the GenAI view)."""
        return f"{self.ui_url}/#/experiments/{self.experiment_id()}/runs/{run_id}?workflowType=machine_learning"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached or written (raised by `MLflowResource.check`)."""


_TRACKING_HEALTH_TIMEOUT_S = 5.0


def _masked(uri: str) -> str:
    """The URI with the password of any `user:password@` part replaced by ***."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", uri)


def _check_tracking_server(uri: str) -> None:
    import httpx

    url = uri.rstrip("/") + "/health"
    try:
        response = httpx.get(url, timeout=_TRACKING_HEALTH_TIMEOUT_S)
    except httpx.TimeoutException:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {_masked(uri)} unreachable: no answer within {_TRACKING_HEALTH_TIMEOUT_S:g}s; "
            "start it (scripts/ui.sh) or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    except httpx.HTTPError as exc:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {_masked(uri)} unreachable ({type(exc).__name__}); "
            "start it (scripts/ui.sh) or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    if response.status_code >= 500:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {_masked(uri)} is failing: GET /health returned HTTP {response.status_code}"
        )


def _check_local_dir(path: str, what: str) -> None:
    try:
        os.makedirs(path or ".", exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailableError(f"{what}: cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path or ".", os.W_OK):
        raise TrackingUnavailableError(f"{what}: {path} is not writable")


def _as_uri(path: str) -> str:
    return path if "://" in path else f"file://{os.path.abspath(path)}"


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be 1/0, true/false, yes/no or on/off, not {os.environ[name]!r}")


def llm_from_env(prefix: str = "MATRIX_") -> LLMResource:
    """The deployment's backend from {prefix}LLM_BACKEND = transformers (default) | vllm (a managed vLLM server,
    started for a run when none answers at {prefix}OPENAI_BASE_URL) | openai | fake,
    {prefix}MODEL, {prefix}OPENAI_BASE_URL, {prefix}OPENAI_API_KEY_ENV, {prefix}LOCAL_MODEL, {prefix}BATCH_SIZE,
    {prefix}BATCH_TOKENS, {prefix}DECODING (refill | static | padded | continuous, local backend),
    {prefix}PREPACK_WEIGHTS (1 | 0, local backend), {prefix}DEVICE (auto | cpu | cuda[:N], local backend),
    {prefix}GPU_BATCH_SIZE (local backend on a GPU). Unset variables keep the resources' field defaults."""
    env = os.environ.get
    kind = env(f"{prefix}LLM_BACKEND", "transformers")
    local = LocalTransformersLLM.model_fields
    batch_size = int(env(f"{prefix}BATCH_SIZE", local["batch_size"].default))
    if kind == "transformers":
        return LocalTransformersLLM(
            model=env(f"{prefix}MODEL", local["model"].default), batch_size=batch_size,
            batch_tokens=int(env(f"{prefix}BATCH_TOKENS", local["batch_tokens"].default)),
            decoding=env(f"{prefix}DECODING", local["decoding"].default),
            prepack_weights=_env_flag(f"{prefix}PREPACK_WEIGHTS", local["prepack_weights"].default),
            device=env(f"{prefix}DEVICE", local["device"].default),
            gpu_batch_size=int(env(f"{prefix}GPU_BATCH_SIZE", local["gpu_batch_size"].default)),
        )
    if kind == "openai":
        key_env = env(f"{prefix}OPENAI_API_KEY_ENV", "OPENAI_API_KEY")
        return OpenAICompatibleLLM(
            base_url=env(f"{prefix}OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
            model=env(f"{prefix}MODEL", DEFAULT_MODEL),
            api_key=dg.EnvVar(key_env) if key_env and env(key_env) else None,
            api_key_env=key_env,
            serve_adapters=_env_flag(f"{prefix}SERVE_ADAPTERS", False),
            adapter_path_on_server=env(f"{prefix}ADAPTER_PATH_ON_SERVER"),
            local_model_for_training=env(f"{prefix}LOCAL_MODEL"),
            batch_size=batch_size,
        )
    if kind == "vllm":
        managed = ManagedVLLM.model_fields
        return ManagedVLLM(model=env(f"{prefix}MODEL", managed["model"].default),
                           base_url=env(f"{prefix}OPENAI_BASE_URL", managed["base_url"].default), batch_size=batch_size)
    if kind == "fake":
        return FakeLLM(tiny_model_path=env(f"{prefix}TINY_MODEL"))
    raise ValueError(f"{prefix}LLM_BACKEND must be transformers, vllm, openai or fake, not {kind!r}")


def judge_from_env() -> LLMResource:
    """The evaluation judge: the pipeline's own model unless MATRIX_JUDGE_LLM_BACKEND names another backend
    (e.g. `openai` with MATRIX_JUDGE_MODEL / MATRIX_JUDGE_OPENAI_BASE_URL for a strong judge)."""
    return llm_from_env("MATRIX_JUDGE_") if os.environ.get("MATRIX_JUDGE_LLM_BACKEND") else llm_from_env()


@dg.definitions
def resources() -> dg.Definitions:
    # URLs that may hold a password travel as dg.EnvVar: Dagster stores the variable's name, resolved at launch.
    store = StoreResource(database_url=dg.EnvVar("MATRIX_DATABASE_URL")) if os.environ.get(
        "MATRIX_DATABASE_URL") else StoreResource()
    tracking = MLflowResource(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI")) if os.environ.get(
        "MLFLOW_TRACKING_URI") else MLflowResource()
    return dg.Definitions(
        resources={"store": store, "llm": llm_from_env(), "judge": judge_from_env(), "mlflow_tracking": tracking}
    )
