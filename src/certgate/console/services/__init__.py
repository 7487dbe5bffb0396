"""certgate.console.services."""
