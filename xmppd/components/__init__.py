"""External components (XEP-0114): services in their own process that serve a domain."""
