"""Selecting images: the query checkpoint and metadata filter terms."""
