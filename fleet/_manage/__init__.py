"""The management server (REST API under /api/, on the instance's own loop) and the
client the ``fleet`` command uses to reach it."""
