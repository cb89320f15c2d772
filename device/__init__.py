"""mgpu: a mediated GPU emulator for QEMU, served over vfio-user in pure Python."""
