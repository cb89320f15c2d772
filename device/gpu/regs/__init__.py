"""The BAR0 registers: the table (single source of truth) and the register file."""
