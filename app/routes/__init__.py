"""HTTP routes: thin adapters that parse input, call one service and return a schema."""
