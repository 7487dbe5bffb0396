"""certgate.pki."""
