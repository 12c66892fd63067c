"""molecule modality (in progress)."""
