"""The engines: command rings, ring commands, the ring engine and the bring-up DMA."""
