"""certgate.planner."""
