"""certgate.access."""
