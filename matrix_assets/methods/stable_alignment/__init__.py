"""Stable Alignment (Liu et al., "Training Socially Aligned Language Models on Simulated Social Interactions",
ICLR 2024, arXiv 2305.16960): a simulated society (SANDBOX) rates and revises the model's answers, and a
rating-margin contrastive loss (`matrix_assets.training.rating_contrastive`) trains on the rated groups.
Protocol and data format after agi-templar/Stable-Alignment (Apache-2.0), prompts reworded."""

from matrix_assets.methods.stable_alignment.data import (
    DEFAULT_MIX, KINDS, REVISED_MARKER, AlignmentData, RatedGroup, build_alignment_data,
)
from matrix_assets.methods.stable_alignment.sandbox import (
    PAPER, Interaction, MemoryHit, PeerFeedback, Rating, SandboxResult, SandboxSettings, minilm_embedder,
    run_sandbox,
)

__all__ = [
    "DEFAULT_MIX", "KINDS", "PAPER", "REVISED_MARKER", "AlignmentData", "Interaction", "MemoryHit", "PeerFeedback",
    "Rating", "RatedGroup", "SandboxResult", "SandboxSettings", "build_alignment_data", "minilm_embedder",
    "run_sandbox",
]
