"""A trained checkpoint as an MLflow pyfunc model: the base model's identity plus the adapter folder, so that
`mlflow.pyfunc.load_model("models:/matrix-aligned@champion")` gives a model that answers prompts.

The base weights are not copied into MLflow (a 135M model is 540 MB, a 13B one 26 GB): the model config names
the base model as this package resolves it (the bundled alias, a local folder or a cached hub id), and the
adapter travels as an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

DEFAULT_MAX_NEW_TOKENS = 128


class AdapterModel(mlflow.pyfunc.PythonModel):
    """Input: a list of prompts, or a DataFrame with a `prompt` column. Output: one answer per prompt.
    `params={"max_new_tokens": N}` sets the answer length."""

    def load_context(self, context: Any) -> None:
        from matrix_assets.llm.transformers_backend import TransformersBackend

        self.backend = TransformersBackend(context.model_config["base_model"],
                                           adapter_path=context.artifacts["adapter"])

    # model_input carries no type hint: MLflow would read one as a second, conflicting signature.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[str]:  # noqa: ANN001
        from matrix_assets.llm.base import GenerationParams

        if hasattr(model_input, "columns"):
            # MLflow hands a list of prompts over as a one-column DataFrame (the signature's unnamed column).
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return [c.text for c in self.backend.generate(conversations, GenerationParams(max_new_tokens=max_new_tokens))]


def log_adapter_model(adapter_dir: str | Path, base_model: str) -> Any:
    """Log the pyfunc model into the active run; returns MLflow's ModelInfo (its `model_uri` registers it)."""
    import matrix_assets

    from mlflow.models import infer_signature

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=AdapterModel(),
        artifacts={"adapter": str(adapter_dir)},
        model_config={"base_model": base_model},
        # Explicit requirements: inferring them would import and inspect the whole environment.
        pip_requirements=[f"matrix-assets=={getattr(matrix_assets, '__version__', '0.1.0')}"],
        # The signature declares the answer-length parameter; without one MLflow silently drops `params`.
        signature=infer_signature(["prompt"], ["answer"], params={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS}),
    )
