"""Temporal activity implementations: the I/O the workflows ask for."""
