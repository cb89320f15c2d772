"""A minimal FUSE filesystem in pure Python, to turn page faults into callbacks.

Each GPU instance in ``fault`` mode gets a one-file FUSE filesystem whose file is its
aperture: QEMU mmaps it, and the kernel asks us for every page the first time it is
touched (a READ).  ``protocol`` is the sans-IO kernel protocol; ``server`` mounts,
serves and revokes.
"""
