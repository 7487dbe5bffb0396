"""certgate.certproxy."""
