"""The REST API process: `/v1/...`, health probes and OpenAPI docs."""
