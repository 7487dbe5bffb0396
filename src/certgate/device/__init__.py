"""certgate.device."""
