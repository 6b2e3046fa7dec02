"""Agent programs the agent-runner tests start as subprocesses (not test modules)."""
