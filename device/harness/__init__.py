"""The guest harness: boot QEMU with instances attached (vm, launch) and drive a device (driver)."""
