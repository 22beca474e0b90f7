"""Model adapters, one per family. ``load_adapter`` picks the family from the model's config."""
