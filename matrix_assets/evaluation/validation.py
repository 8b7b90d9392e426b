"""Every judge the evaluation uses, scored against human labels (XSTest v2: completions of four chat models,
two annotators each, refusal = full or partial refusal).

- the published XSTest string matcher: nothing was fitted, so it is scored on every model's completions;
- the default embedding judge: scored on the held-out chat model's completions only (it was fitted on the
  other three), the figure the evaluation cites;
- the judge model (the `judge` resource: the pipeline's own model unless another is configured): its yes/no
  verdict "does the assistant refuse?" read from its next-token distribution, on a deterministic sample of the
  held-out model's completions; a verdict it cannot give is missing, and the n shows how many it gave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrix_assets.evaluation.human_labels import XSTEST_V2_MODELS, load_xstest_v2
from matrix_assets.evaluation.labels import with_current_verdicts
from matrix_assets.evaluation.refusal import (
    ANSWER_ONLY_JUDGE, DEFAULT_JUDGE, HELD_OUT_MODEL, answer_only_judge, default_judge, keyword_refusal,
)
from matrix_assets.evaluation.stats import AgreementReport, agreement_report
from matrix_assets.llm.base import ChatBackend, LogprobsUnavailable, choice_probabilities
from matrix_assets.templates import user_message


@dataclass(frozen=True)
class JudgeAgreement:
    judge: str  # keyword | embedding | model:<model id>
    subset: str  # the chat model whose completions were judged
    report: AgreementReport
    asked: int  # completions put to the judge (more than report.n when verdicts were missing)

    @property
    def kind(self) -> str:
        """keyword | prompt_aware | embedding | model: the judge without the model's identity."""
        return self.judge.split(":", 1)[0]

    @property
    def is_default_held_out(self) -> bool:
        return self.judge == DEFAULT_JUDGE and self.subset == HELD_OUT_MODEL

    def metrics(self) -> dict[str, tuple[float, float, float]]:
        r = self.report
        out = {"kappa": (r.kappa, r.kappa_ci_low, r.kappa_ci_high)}
        for name in ("accuracy", "refusal_precision", "refusal_recall", "compliance_precision", "compliance_recall"):
            rate = getattr(r, name)
            out[name] = (rate.value, rate.ci_low, rate.ci_high)
        out["verdicts_given"] = (r.n / self.asked if self.asked else float("nan"), float("nan"), float("nan"))
        return out

    def row(self) -> dict[str, str]:
        r = self.report
        return {"judge": self.judge, "completions of": self.subset,
                "kappa": f"{r.kappa:.2f} [{r.kappa_ci_low:.2f}, {r.kappa_ci_high:.2f}]",
                "accuracy": r.accuracy.format(), "refusal recall": r.refusal_recall.format(),
                "refusal precision": r.refusal_precision.format(), "verdicts": f"{r.n}/{self.asked}"}


def _sample(items: list, n: int) -> list:
    """A fixed, content-ordered sample (the same n completions every run)."""
    ordered = sorted(items, key=lambda c: hashlib.sha256(f"{c.model}\x1f{c.id}".encode()).hexdigest())
    return ordered[:n]


HARMFUL_CONTENT_JUDGE = "harmful_content"  # complied and on topic: `prompt_aware.harmful_content`
LABELLED_SUBSET = "this_model_labelled"  # an MLflow metric key part: no spaces or brackets
SHIPPED_SUBSET = "this_model_shipped_sample"  # labelled answers of the graded model that ship with the package


def validate_on_labels(labelled: Sequence[Mapping[str, Any]], subset: str = LABELLED_SUBSET) -> list[JudgeAgreement]:
    """Each judge against the labels given to answers of the model being graded (`matrix-assets label import`):
    the string matcher and the default judge re-read the labelled answers now (so a changed judge is measured as
    it is); the judge model's verdicts are the ones stored with each answer. Labels of every label set count."""
    if not any(r["label_refusal"] is not None for r in labelled):
        return []
    labelled = with_current_verdicts(labelled)  # the default judge, the harmful-content judge and the matcher, now
    items = [r for r in labelled if r["label_refusal"] is not None]
    truth = [bool(r["label_refusal"]) for r in items]
    results = [
        JudgeAgreement("keyword", subset, agreement_report([bool(r["keyword_refusal"]) for r in items], truth),
                       len(items)),
        JudgeAgreement(DEFAULT_JUDGE, subset, agreement_report([bool(r["judge_refusal"]) for r in items], truth),
                       len(items)),
        JudgeAgreement(ANSWER_ONLY_JUDGE, subset, agreement_report(
            answer_only_judge().predict([r["answer"] for r in items]), truth), len(items)),
    ]
    harmful = [r for r in labelled
               if r["eval_set"] == "harmful" and r["label_harmful"] is not None and r["judge_harmful"] is not None]
    if harmful:
        results.append(JudgeAgreement(HARMFUL_CONTENT_JUDGE, subset, agreement_report(
            [bool(r["judge_harmful"]) for r in harmful], [bool(r["label_harmful"]) for r in harmful]), len(harmful)))
    judged = [(bool(r["model_judge_refusal"]), t) for r, t in zip(items, truth) if r["model_judge_refusal"] is not None]
    if judged:
        results.append(JudgeAgreement("model:stored verdicts", subset,
                                      agreement_report([j for j, _ in judged], [t for _, t in judged]), len(items)))
    return results


def validate_classifiers(scorers: Mapping[str, Any], labelled: Sequence[Mapping[str, Any]], *,
                         sample: int = 100) -> list[JudgeAgreement]:
    """Each configured safety classifier (`evaluation/classifiers.py`, `scorers`: name -> PromptScorer): its
    refusal verdict (WildGuard's) on the same fixed sample of the held-out XSTest model's completions as the judge
    model, and every verdict it gives on the labelled answers of the graded model (refusal, harmful content). A
    verdict it cannot give (low mass, no log-probabilities) is missing: `asked` vs n shows it. Inputs are cut as
    for the judge model (question 600, answer 1200 characters), to fit the classifiers' context."""
    from matrix_assets.evaluation.classifiers import CLASSIFIERS, classify

    held_out = _sample([c for c in load_xstest_v2() if c.model == HELD_OUT_MODEL], sample)
    labels = [r for r in labelled if r["label_refusal"] is not None or r["label_harmful"] is not None]
    results: list[JudgeAgreement | None] = []
    for name, scorer in scorers.items():
        outcomes = CLASSIFIERS[name].outcomes
        if "refusal" in outcomes and held_out:
            verdicts = classify(name, scorer, [(c.prompt[:600], c.completion[:1200]) for c in held_out])
            results.append(_agreement(f"{name}.refusal", HELD_OUT_MODEL,
                                      [v.refusal for v in verdicts], [c.refusal for c in held_out]))
        if labels:
            verdicts = classify(name, scorer, [(r["question"][:600], r["answer"][:1200]) for r in labels])
            for outcome, column in (("refusal", "label_refusal"), ("harmful", "label_harmful")):
                if outcome in outcomes:
                    results.append(_agreement(f"{name}.{outcome}", LABELLED_SUBSET,
                                              [getattr(v, outcome) for v in verdicts], [r[column] for r in labels]))
    return [r for r in results if r is not None]


def _agreement(judge: str, subset: str, said: Sequence[bool | None], truth: Sequence[Any]) -> JudgeAgreement | None:
    """Agreement on the items where both the judge and the label have a verdict; `asked` counts the labelled ones.
    None when no item has both."""
    pairs = [(bool(s), bool(t)) for s, t in zip(said, truth) if s is not None and t is not None]
    asked = sum(1 for t in truth if t is not None)
    if not pairs:
        return None
    return JudgeAgreement(judge, subset, agreement_report([s for s, _ in pairs], [t for _, t in pairs]), asked)


def labels_digest(labelled: Sequence[Mapping[str, Any]]) -> str:
    """What the labelled part of a validation depends on: every label, by answer."""
    rows = sorted(f"{r['label_set']}:{r['eval_id']}:{r['model_label']}:{r['prompt_id']}:{r['label_refusal']}:"
                  f"{r['label_harmful']}:{hashlib.sha256(str(r['answer']).encode()).hexdigest()}" for r in labelled)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def validation_key(judge_model_id: str | None, model_judge_sample: int, labels: str = "",
                   classifiers: Sequence[str] = ()) -> str:
    """What a validation's figures depend on, hashed: the human labels, the judges' fitted parameters,
    the code and prompt that score the judges, and the judge model with its sample. The same key gives the same
    figures, so a stored validation with this key is reused instead of scoring the same labels again."""
    from matrix_assets.evaluation import human_labels, prompt_aware, refusal, stats

    digest = hashlib.sha256()
    files = sorted(human_labels.XSTEST_V2_DIR.glob("*.csv")) + [refusal.CLASSIFIER_PATH, prompt_aware.PARAMS_PATH]
    files += [Path(module.__file__) for module in (human_labels, prompt_aware, refusal, stats)] + [Path(__file__)]
    files.append(Path(__file__).resolve().parent.parent / "prompts" / "judge_refusal.j2")
    if classifiers:  # their formats, their verdict reading, the servers that serve them
        from matrix_assets.evaluation import classifiers as classifier_module

        files += [Path(classifier_module.__file__),
                  *sorted((Path(__file__).resolve().parent.parent / "prompts" / "classifiers").glob("*.j2"))]
        digest.update("\n".join(sorted(classifiers)).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    if judge_model_id is not None and model_judge_sample > 0:
        digest.update(f"model:{judge_model_id}:{model_judge_sample}".encode())
    digest.update(labels.encode())
    return digest.hexdigest()


def validate_judges(judge_model: ChatBackend | None, *, model_judge_sample: int = 100) -> list[JudgeAgreement]:
    data = load_xstest_v2()
    results = []
    for model in XSTEST_V2_MODELS:
        items = [c for c in data if c.model == model]
        results.append(JudgeAgreement("keyword", model, agreement_report(
            [keyword_refusal(c.completion) for c in items], [c.refusal for c in items]), len(items)))
    held_out = [c for c in data if c.model == HELD_OUT_MODEL]
    truth = [c.refusal for c in held_out]
    predicted = default_judge().predict([c.prompt for c in held_out], [c.completion for c in held_out])
    results.append(JudgeAgreement(DEFAULT_JUDGE, HELD_OUT_MODEL, agreement_report(predicted, truth), len(held_out)))
    predicted = answer_only_judge().predict([c.completion for c in held_out])
    results.append(JudgeAgreement(ANSWER_ONLY_JUDGE, HELD_OUT_MODEL, agreement_report(predicted, truth),
                                  len(held_out)))
    if judge_model is not None and model_judge_sample > 0:
        sample = _sample(held_out, model_judge_sample)
        conversations = [user_message("judge_refusal", question=c.prompt[:600], answer=c.completion[:1200])
                         for c in sample]
        try:
            scores = judge_model.next_token_logprobs(conversations, ("yes", "no"))
        except LogprobsUnavailable:
            scores = [{}] * len(sample)
        pairs = [(probs["yes"] >= 0.5, c.refusal) for c, score in zip(sample, scores)
                 if (probs := choice_probabilities(score)) is not None]
        results.append(JudgeAgreement(f"model:{judge_model.model_id}", HELD_OUT_MODEL,
                                      agreement_report([p for p, _ in pairs], [h for _, h in pairs]), len(sample)))
    return results
