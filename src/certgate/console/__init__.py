"""certgate.console."""
