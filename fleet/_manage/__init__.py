"""The management server: the REST API, metrics and the dashboard of one instance."""
