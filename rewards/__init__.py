"""Rewards, one module per modality plus `common` (modality-agnostic combinators)."""
