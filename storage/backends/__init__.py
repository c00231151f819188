"""Concrete storage backends."""
