"""certgate.console.store."""
