"""The replica process: constructs the user object and serves its calls."""
