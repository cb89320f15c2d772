"""Device memory: the shared pool, resources, residency and the GPU MMU page table."""
