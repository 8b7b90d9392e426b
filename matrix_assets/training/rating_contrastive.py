"""Stable Alignment's rating-margin contrastive loss, as a `compute_loss` override of TRL's `SFTTrainer`.

Liu et al., "Training Socially Aligned Language Models on Simulated Social Interactions" (ICLR 2024,
arXiv 2305.16960), section 3.2; the formula is the one of the released code (agi-templar/Stable-Alignment,
Apache-2.0), which trained the released model. For one question group, k = min(n, group_size) rated responses
are sampled; with l_j the mean token negative log-likelihood of response j (prompt tokens masked), b the best
rated one (ties: the first in the sampled order), S the rating scale, M the margin and lambda the weight:

    d_j = l_b - l_j + (r_b - r_j) / S * M        for every j != b
    L   = l_b + lambda * max(0, mean_{j != b} d_j)    ("max" variant: max over j instead of the mean)
    L   = l_b                                     when k = 1 (plain SFT)

No reference model and no reward model: the ratings of the simulated society shape the margins directly. TRL has
no trainer for it (DPO needs a reference model, CPO / SimPO / ORPO / KTO are pairwise with a constant margin or
none), so this keeps SFTTrainer's loop, PEFT wrapping and fused LM head and replaces only the loss and the batch.

Two defects of the released code are not copied: it reads the margins with the original indices after sorting
the ratings (right only when the best response was sampled first), here every index refers to the sampled order;
and its collator keeps only the last group of a batch (batch size 1 in effect), here a batch holds several whole
groups and the loss is the mean over them.

This module imports torch and TRL at the top: import it only where training happens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from trl import SFTConfig, SFTTrainer

from matrix_assets.training.sft import check_rating_loss

IGNORE_INDEX = -100
LossVariant = Literal["mean", "max"]


def best_index(ratings: torch.Tensor) -> int:
    """Index of the best rating; ties go to the first one (a stable choice, unlike the released code's sort)."""
    return int(torch.nonzero(ratings == ratings.max())[0, 0])


def rating_margin_loss(
    nll: torch.Tensor,
    ratings: torch.Tensor,
    *,
    margin: float,
    weight: float,
    scale: float = 7.0,
    variant: LossVariant = "mean",
) -> torch.Tensor:
    """Stable Alignment's loss for one group: `nll[j]` is the mean token NLL of response j, `ratings[j]` its rating,
    both in the sampled order. Differentiable in `nll`; `ratings` are constants."""
    if nll.dim() != 1 or nll.shape != ratings.shape or nll.numel() == 0:
        raise ValueError(f"need two 1-D tensors of the same non-zero length, got {tuple(nll.shape)} and "
                         f"{tuple(ratings.shape)}")
    if variant not in ("mean", "max"):
        raise ValueError(f"loss variant must be 'mean' or 'max', got {variant!r}")
    ratings = ratings.to(nll.dtype)
    b = best_index(ratings)
    if nll.numel() == 1:
        return nll[b]
    others = torch.arange(nll.numel(), device=nll.device) != b
    # Margins use the same (sampled-order) indices as the losses: the released code's defect 1 is not copied.
    d = nll[b] - nll[others] + (ratings[b] - ratings[others]) / scale * margin
    pooled = d.mean() if variant == "mean" else d.max()
    return nll[b] + weight * torch.clamp(pooled, min=0.0)


@dataclass
class StableAlignmentConfig(SFTConfig):
    """`SFTConfig` plus the knobs of Stable Alignment's loss (Liu et al., ICLR 2024, section 3.2).

    The dataset holds one row per question group (`group_id`, `prompt`, `responses`, `ratings`); the trainer's
    collator tokenizes it, so TRL's own dataset preparation is skipped and no column is dropped.
    """

    margin: float = field(
        default=1.0,
        metadata={"help": "M: how far apart (in NLL) a better-rated response should sit, per full rating scale. "
                          "1.0 trained the released checkpoint; the repository's example command uses 10."},
    )
    rating_weight: float = field(
        default=0.2,
        metadata={"help": "lambda: weight of the rating-margin hinge against the best response's NLL (released: 0.2)."},
    )
    rating_scale: float = field(
        default=7.0,
        metadata={"help": "S: the rating scale the margins are divided by (the society rates 1-7)."},
    )
    group_size: int = field(
        default=3,
        metadata={"help": "k: responses sampled per group at each visit, min(n, k) (released: 3)."},
    )
    loss_variant: LossVariant = field(
        default="mean",
        metadata={"help": "How the margins of the other responses are pooled inside the hinge: 'mean' (released "
                          "model) or 'max' (the code's max_flow option)."},
    )
    # The collator needs the raw group columns; TRL would otherwise drop them before it sees a batch.
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Must stay False: the group columns are consumed by the collator."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        kwargs = dict(self.dataset_kwargs or {})
        if kwargs.get("skip_prepare_dataset") is False:
            raise ValueError("Stable Alignment tokenizes its groups in the collator: skip_prepare_dataset must be True")
        kwargs["skip_prepare_dataset"] = True
        self.dataset_kwargs = kwargs
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the collator reads the group columns")
        check_rating_loss(self)


def groups_to_rows(groups: Sequence[Any]) -> list[dict]:
    """Dataset rows from rated groups: anything with `group_id`, `prompt` and `responses` of `text` / `rating`
    (Stable Alignment's `RatedGroup`, or a method's `TrainingGroup`, whose `excluded` ones are left out). Groups of
    several responses need every rating; a single response needs none."""
    rows = []
    for g in groups:
        if getattr(g, "excluded", None):
            continue
        if not g.responses:
            raise ValueError(f"group {g.group_id} has no responses")
        if len(g.responses) > 1 and any(r.rating is None for r in g.responses):
            raise ValueError(f"group {g.group_id} has a response without a rating: the loss needs every rating")
        rows.append({
            "group_id": g.group_id,
            "prompt": g.prompt,
            "responses": [r.text for r in g.responses],
            # A group of one response (e.g. a benign self-answer) trains with L = l_b, plain SFT: its rating, if
            # any, is never compared, so an unrated one is as good as any.
            "ratings": [0.0 if r.rating is None else float(r.rating) for r in g.responses],
        })
    return rows


def tokenize_prompt_completion(tokenizer: Any, prompt: str, response: str,
                               max_length: int | None) -> tuple[list[int], list[int]]:
    """Token ids and labels of one (user prompt, assistant response) pair, as TRL's SFTTrainer prepares a
    conversational prompt-completion example: the chat template renders both, the completion starts where the prompt
    (with its generation prompt) stops being a prefix, prompt tokens get the ignore label, and the sequence is cut to
    `max_length` from the end."""
    user = [{"role": "user", "content": prompt}]
    prompt_ids = list(tokenizer.apply_chat_template(user, tokenize=True, return_dict=True,
                                                    add_generation_prompt=True)["input_ids"])
    full_ids = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                                  tokenize=True, return_dict=True)["input_ids"])
    start = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        start += 1
    labels = [IGNORE_INDEX] * start + full_ids[start:]
    if max_length is not None:
        full_ids, labels = full_ids[:max_length], labels[:max_length]
    return full_ids, labels


class GroupCollator:
    """Turns a list of group rows into one batch that keeps every group whole.

    Each visit of a group samples k = min(n, group_size) of its responses without replacement, in random order (as
    the released code does), from a `random.Random` seeded by (seed, group id, how many times this group was drawn
    before): a run is reproducible, and a later epoch may see another subset of a large group. The batch carries
    `ratings` (one per row) and `group_index` (which group of the batch each row belongs to).
    """

    def __init__(self, tokenizer: Any, *, group_size: int = 3, max_length: int | None = 1024, seed: int = 0) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_length = max_length
        self.seed = seed
        self._visits: dict[str, int] = {}

    def sample(self, group_id: str, n: int) -> list[int]:
        visit = self._visits.get(group_id, 0)
        self._visits[group_id] = visit + 1
        return random.Random(f"{self.seed}:{group_id}:{visit}").sample(range(n), min(n, self.group_size))

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels, ratings, group_index = [], [], [], []
        skipped_groups = 0
        for g, feature in enumerate(features):
            responses, scores = feature["responses"], feature["ratings"]
            if len(responses) != len(scores) or not responses:
                raise ValueError(f"group {feature['group_id']}: {len(responses)} responses, {len(scores)} ratings")
            kept = 0
            for j in self.sample(str(feature["group_id"]), len(responses)):
                seq, lab = tokenize_prompt_completion(self.tokenizer, feature["prompt"], responses[j], self.max_length)
                if all(t == IGNORE_INDEX for t in lab):
                    continue  # cut away by max_length: an empty response would look perfect (NLL 0)
                ids.append(seq)
                labels.append(lab)
                ratings.append(float(scores[j]))
                group_index.append(g - skipped_groups)
                kept += 1
            skipped_groups += kept == 0
        if not ids:
            raise ValueError(f"max_length={self.max_length} leaves no response token in this batch: raise it")
        width = max(len(s) for s in ids)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], dtype=torch.long),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels], dtype=torch.long),
            "ratings": torch.tensor(ratings, dtype=torch.float32),
            "group_index": torch.tensor(group_index, dtype=torch.long),
        }


class StableAlignmentTrainer(SFTTrainer):
    """SFTTrainer whose loss is Stable Alignment's, computed per question group and averaged over the groups of
    the batch. Pass a `StableAlignmentConfig`, a tokenizer as `processing_class`, and a dataset of group rows
    (`groups_to_rows`); LoRA goes in as `peft_config` like for SFT."""

    _tag_names = ["trl", "sft", "stable-alignment"]
    _name = "Stable Alignment"
    # The loss is a mean over the groups of one micro-batch, not a token sum over the accumulated batch: the
    # Trainer divides it by the number of accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: Any, args: StableAlignmentConfig, *, processing_class: Any, data_collator: Any = None,
                 **kwargs: Any) -> None:
        if not isinstance(args, StableAlignmentConfig):
            raise TypeError(f"args must be a StableAlignmentConfig, got {type(args).__name__}")
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if data_collator is None:
            data_collator = GroupCollator(processing_class, group_size=args.group_size, max_length=args.max_length,
                                          seed=args.seed)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator,
                         **kwargs)
        # The loss is a mean over the micro-batch's groups, never normalized by a token count: with gradient
        # accumulation the Trainer must divide it by the number of micro-batches (a mean over all groups).
        self.loss_is_scaled_for_ga = False

    def sequence_nll(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Mean token NLL of every row's response (prompt and padding masked), from TRL's fused LM head (no full
        logits tensor is built)."""
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        labels=inputs["labels"], use_cache=False, fused_lm_head=True)
        tokens = outputs.label_mask.sum(-1)
        nll = -outputs.log_probs.sum(-1) / tokens.clamp(min=1)
        return nll, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN201
        mode = "train" if self.model.training else "eval"
        ratings, group_index = inputs["ratings"], inputs["group_index"]
        nll, outputs = self.sequence_nll(model, inputs)
        args: StableAlignmentConfig = self.args
        losses, best_nll = [], []
        for g in torch.unique(group_index, sorted=True).tolist():
            rows = group_index == g
            losses.append(rating_margin_loss(nll[rows], ratings[rows], margin=args.margin, weight=args.rating_weight,
                                             scale=args.rating_scale, variant=args.loss_variant))
            best_nll.append(nll[rows][best_index(ratings[rows])].detach())
        loss = torch.stack(losses).mean()  # the mean over groups (defect 2 of the released collator not copied)

        metrics = self._metrics[mode]
        valid = outputs.label_mask.sum()
        if valid > 0:
            metrics["entropy"].append(float(outputs.entropy.detach().sum() / valid))
            metrics["mean_token_accuracy"].append(float(outputs.is_top1.sum() / valid))
        best = torch.stack(best_nll).mean()
        metrics["nll_best"].append(float(best))
        hinge = float((loss.detach() - best) / args.rating_weight) if args.rating_weight else 0.0
        metrics["rating_hinge"].append(hinge)  # mean over groups of max(0, pooled margin)
        metrics["responses_per_group"].append(len(ratings) / len(losses))
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum())
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
