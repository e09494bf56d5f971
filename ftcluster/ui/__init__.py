"""What the CLI shows on a terminal: tables that keep ids whole, and a run's live progress."""
