"""Business tasks, written the way a task author writes them: small and declarative."""
