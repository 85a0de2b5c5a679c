"""fleet's data plane: length-prefixed frames over persistent, multiplexed connections."""
