"""Weights, configs and model cards of the shipped models (one pipeline folder per model)."""
