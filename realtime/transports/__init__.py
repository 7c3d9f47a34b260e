"""Carrier and browser media transports: wire protocol in, session events out."""
