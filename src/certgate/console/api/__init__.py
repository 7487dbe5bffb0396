"""certgate.console.api."""
