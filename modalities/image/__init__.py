"""image modality (in progress)."""
