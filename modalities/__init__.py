"""Modality adapters: each sub-package wraps a denoiser for one kind of data behind `Backbone`."""
