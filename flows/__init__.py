"""Prefect flows: the end-to-end pipeline, one flow per stage, the CLI and deployments."""
