"""attnmaps: class-specific attention maps for vision models."""

__version__ = "0.1.0"
