"""The pipelines' adapter hooks (`registry.ADAPTERS` imports this module on first lookup)."""
from . import embeddings  # noqa: F401  (registers its hooks)
