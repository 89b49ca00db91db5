"""Bulk image jobs: the job service, its store, parameters, admission and idempotency."""
