"""Discrete-event simulator benchmark of the Koinon scheduler against naive placement."""
