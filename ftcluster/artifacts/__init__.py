"""Published artifacts (adapters, merged models) read back: checks over what training wrote, torch-free."""
