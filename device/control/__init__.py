"""The control plane: the GpuServer API (create/destroy instances at run time) and the CLI."""
