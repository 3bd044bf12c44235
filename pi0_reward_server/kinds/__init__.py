"""Task kinds: one module each behind one interface, found through :mod:`.registry`."""
