"""The vfio-user stack: protocol codec, transport, session and dispatcher, endpoints,
DMA table, IRQ lines, and the client library."""
