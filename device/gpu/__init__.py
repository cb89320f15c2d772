"""The emulated GPU: register map and the per-VM GPU instance device model."""
