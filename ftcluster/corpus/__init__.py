"""Prepared corpora (token shards + manifest on any fsspec store): the format, read without torch."""
