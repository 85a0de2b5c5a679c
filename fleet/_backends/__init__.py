"""Backends: the only code that knows how replica processes are made."""
