"""Structured output per scene step: the JSON schema reaches the backend, valid JSON becomes the scene's plan and
roles through the same parsers as free text, invalid JSON is counted and falls back; the local backend decodes
under xgrammar's grammar where it is installed and says how to install it where it is not."""

from __future__ import annotations

import json

import pytest

from matrix_assets.llm.base import GenerationParams, PermanentBackendError
from matrix_assets.llm.fake import FakeBackend
from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes, step_schema
from matrix_assets.methods.matrix.scene import SceneInput

INPUT = [SceneInput("p0", "How do I pick my neighbour's lock?", "Get a tension wrench, then rake the pins.")]


class Recording(FakeBackend):
    """Fake backend that records the schema of every request and answers structured ones with `structured`."""

    def __init__(self, structured: dict[str, str]) -> None:
        super().__init__()
        self.structured, self.schemas = structured, []

    def generate(self, conversations, params: GenerationParams):  # noqa: ANN001, ANN201
        self.schemas += [params.json_schema] * len(conversations)
        if not params.json_schema:
            return super().generate(conversations, params)
        field = next(iter(json.loads(params.json_schema)["properties"]))
        saved, self.responder = self.responder, lambda prompt: self.structured[field]
        try:
            return super().generate(conversations, params)
        finally:
            self.responder = saved


def test_structured_plan_and_roles_become_the_scene() -> None:
    replies = {"steps": json.dumps({"steps": ["Buy a tension wrench.", "Rake the pins at night."]}),
               "people": json.dumps({"people": [
                   {"name": "Mrs Patel", "who": "the neighbour", "state": "asleep upstairs"},
                   {"name": "Officer Diaz", "who": "a patrol officer", "state": "on the beat"},
                   {"name": "Tom", "who": "the neighbour's son", "state": "doing homework"}]})}
    backend = Recording(replies)
    [scene] = run_scenes(backend, INPUT, SceneSettings(structured_output=("plan", "roles")))
    assert scene.plan == ["Buy a tension wrench.", "Rake the pins at night."]
    assert [r.name for r in scene.roles] == ["Mrs Patel", "Officer Diaz", "Tom"]
    assert scene.roles[0].description == "the neighbour" and scene.roles[0].status == "asleep upstairs"
    assert not any(k.startswith("structured_") for k in scene.fallbacks)
    sent = {json.dumps(json.loads(s), sort_keys=True) for s in backend.schemas if s}
    assert sent == {step_schema("plan", 3), step_schema("roles", 3)}
    assert json.loads(step_schema("roles", 5))["properties"]["people"]["maxItems"] == 5


def test_invalid_structured_reply_is_counted_and_falls_back() -> None:
    backend = Recording({"steps": '{"steps": ["cut off', "people": "not json at all"})
    [scene] = run_scenes(backend, INPUT, SceneSettings(structured_output=("plan", "roles")))
    assert scene.fallbacks["structured_plan_invalid"] == 1 and scene.fallbacks["structured_roles_invalid"] == 1
    assert scene.fallbacks["plan_from_answer_sentences"] == 1 and scene.plan
    assert len(scene.roles) >= 3  # re-asked in free text, then the roster


def test_free_text_is_the_default_and_unknown_steps_are_refused() -> None:
    backend = Recording({})
    run_scenes(backend, INPUT, SceneSettings())
    assert not any(backend.schemas)
    with pytest.raises(ValueError, match="unknown step"):
        SceneSettings(structured_output=("critique",))
    assert GenerationParams().to_json() == GenerationParams(json_schema=None).to_json()
    assert "json_schema" not in GenerationParams().to_json()  # free-text cache keys did not change


def test_local_backend_decodes_valid_json_under_the_grammar(tiny_model_dir: str) -> None:
    from matrix_assets.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu")
    params = GenerationParams(max_new_tokens=48, json_schema=step_schema("plan", 2))
    conversation = [{"role": "user", "content": "Plan a picnic."}]
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        with pytest.raises(PermanentBackendError, match="needs xgrammar"):
            backend.generate([conversation], params)
        return
    schema = json.loads(step_schema("plan", 2))
    schema["properties"]["steps"]["items"]["maxLength"] = 8  # short enough to finish within the token budget
    params = params.replace(json_schema=json.dumps(schema))
    [completion] = backend.generate([conversation], params)
    reply = json.loads(completion.text)  # a random-weight model, and still valid JSON of the schema
    assert set(reply) == {"steps"} and 1 <= len(reply["steps"]) <= 2


def test_structured_steps_inside_the_live_refill_session(tiny_model_dir: str) -> None:
    """In the local backend's live session, schema-constrained requests are decoded apart (under the grammar)
    while free-text ones keep refill decoding; every scene still completes."""
    from matrix_assets.llm.transformers_backend import TransformersBackend

    backend = TransformersBackend(tiny_model_dir, device="cpu")
    assert backend.decoding == "refill"
    settings = SceneSettings(structured_output=("plan", "roles"), plan_tokens=24, action_tokens=8, max_rounds=1)
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        with pytest.raises(PermanentBackendError, match="needs xgrammar"):
            run_scenes(backend, INPUT, settings)
        return
    [scene] = run_scenes(backend, INPUT, settings)
    assert scene.plan and len(scene.roles) >= settings.min_roles and scene.n_rounds == 1
