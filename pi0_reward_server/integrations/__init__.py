"""Trainer adapters: each trainer calls rewards in its own shape."""
