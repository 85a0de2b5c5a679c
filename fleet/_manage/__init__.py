"""The management server's parts (a Starlette app in the instance's process)."""
