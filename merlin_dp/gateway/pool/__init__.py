"""Replicas as the gateway sees them: health state and a connection pool per protocol."""
