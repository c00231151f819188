"""Accounts and login policy."""
