"""Jobs: the one path work runs by, and the store that keeps them."""
