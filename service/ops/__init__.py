"""Operating the service: health probes and the OpenAPI document."""
