"""The management server (REST API under /api/, metrics, logs and the dashboard, on the
instance's own loop) and the client the ``fleet`` command uses to reach it."""
