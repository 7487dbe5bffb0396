"""certgate.tunnel."""
