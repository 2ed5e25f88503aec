"""Serving the exported translator: TF Serving config, a gRPC client and a development server."""
