"""One GPU instance: PCI identity, regions, interrupts, and the composition of its parts."""
