"""Realtime media side: transports, media pipeline and the per-call session."""
