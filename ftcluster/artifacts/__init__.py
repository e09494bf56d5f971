"""Trained artifacts as things to keep: their records and lineage, listings, and serving checks."""
