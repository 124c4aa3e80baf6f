"""Rules: indexing (being written)."""
