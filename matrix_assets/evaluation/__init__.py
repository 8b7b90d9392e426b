"""Evaluation helpers: metrics, rule-based classifiers and plots for base vs tuned models."""
