"""Shared fixtures: isolated state folders, a tiny real Llama for fast training tests, Dagster resources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def matrix_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every path the pipeline writes to, moved under tmp_path."""
    home = tmp_path / "matrix_home"
    monkeypatch.setenv("MATRIX_HOME", str(home))
    monkeypatch.setenv("MATRIX_DAGSTER_STORAGE", str(home / "dagster"))
    for var in ("MATRIX_DATABASE_URL", "MLFLOW_TRACKING_URI", "MATRIX_DROP_DIR", "MATRIX_MLFLOW_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer Llama with the real SmolLM2 tokenizer and chat template: trains and generates in well under 1 s."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "smollm2_tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def fake_resources(matrix_home: Path, tiny_model_dir: str) -> dict:
    from matrix_assets.defs.resources import FakeLLM, MLflowResource, StoreResource

    return {
        "store": StoreResource(database_url=f"sqlite:///{matrix_home / 'matrix.db'}"),
        "llm": FakeLLM(tiny_model_path=tiny_model_dir),
        "judge": FakeLLM(),
        "mlflow_tracking": MLflowResource(
            tracking_uri=f"sqlite:///{matrix_home / 'mlflow.db'}", artifact_root=str(matrix_home / "mlartifacts")
        ),
    }
