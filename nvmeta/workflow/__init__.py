"""Workflow glue: job bodies of ``run:`` rules, rule inputs, per-job logs and the config checks."""
