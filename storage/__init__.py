"""Persistence: item store and blob store adapters, backends and the cache."""
