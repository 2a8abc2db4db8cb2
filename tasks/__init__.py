"""Prefect tasks: one per stage. Each says its cache policy, runs the rlhf_core entry, returns a manifest."""
