"""The BAR2 window: what a guest touch of an aperture page gets, and the fault log."""
