"""Accounts, credits and their ledger, API keys, console sign-in and the audit log."""
