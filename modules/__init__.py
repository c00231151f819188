"""Feature modules loaded by the module host (one file per feature)."""
