"""PCI building blocks: config space with capabilities and BAR emulation."""
