"""Micrograph and coordinate file formats."""
