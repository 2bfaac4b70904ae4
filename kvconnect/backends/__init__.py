"""Backends: each a scheduler half and a worker half implementing kvconnect.api (see kvconnect.registry)."""
