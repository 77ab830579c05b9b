"""Runnable experiments built on factorlab components; each is reachable from the `factorlab` CLI."""
