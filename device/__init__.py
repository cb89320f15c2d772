"""mgpu: a mediated GPU emulator for QEMU, served over vfio-user in pure Python.

The layers, bottom up.  Imports only go down: a module imports from its own layer or
the ones below it, never above.

    harness/      guest harness: QEMU's command line (qemu), a guest driven through QMP
                  and its agent (vm), run_qemu.sh (launch, its options in
                  launch_options), the pytest plugin driver projects use
                  (pytest_plugin) and a reference Python driver (driver) for tests
    control/      control plane: GpuServer (create and destroy instances at run time,
                  events, manager), the command table (commands: the single source
                  of truth of the control socket; schema: what it is made of), the
                  QMP control socket (qmp), the command line (cli: serve, with
                  --vnc and --web) and its mdevctl-style client commands (ctl)
    insight/      what the device saw, in the driver's words: names from the device's
                  tables (names), trace records decoded (decode: mgpu trace show --decode,
                  mgpu trace decode FILE) and laid out for Perfetto (perfetto); coverage
                  and record/replay are designed in docs/insight.md
    display/      what instances show: the FrameSource protocol a display engine
                  implements and Framebuffer, one over a numpy buffer (source),
                  frames and pixel formats to RGB (frame), the displays by name
                  (registry), PNG screendumps (screendump), changed tiles (tiles),
                  the VNC server (rfb: the protocol sans I/O; vnc_session: one
                  client; vnc: the thread and the ports) and the browser page (web)
    gpu/          the device model, in sublayers (bottom up; tests/test_layers.py):
                    abi               the numbers a guest driver hard-codes: error codes,
                                      interrupt bits, resource commands, status values
                    modes, types      InterruptMode, MappingMode, DeniedPolicy; the
                                      instance types
                    inject            fault injection: the fault table and its state
                    regs/             the BAR0 register table (single source of truth)
                                      and the register file (values, write actions)
                    memory/           one physical GPU's device memory (physical: the
                                      shared pool, eviction and page-in; device_memory,
                                      allocator), resources (pages, residency, pins) and
                                      the GPU MMU page table (page_table)
                    aperture/         the BAR2 window (window: validate_map_request at
                                      fault time, parked faults, fences, coherency), the
                                      denied-access policy and the fault log
                    engine/           command rings, ring commands (commands: layout, doc
                                      and handler in one), the engine that runs them
                                      (executor) and the bring-up DMA
                    instance/         one instance (instance) composes its parts: PCI
                                      identity, regions, interrupts, the RES_* commands;
                                      api (observation, injection) and hosts (what the
                                      workers call back) are its mixins
    fuse/         the fault engine: a one-file FUSE filesystem whose reads are page
                  faults (protocol: the kernel protocol; server: mount, serve, revoke)
    pci/          PCI building blocks: config space (config) and one builder per
                  capability (capabilities)
    conformance/  a vfio-user conformance suite, a client of the protocol only: good and
                  hostile checks against any server by its socket path
                  (``python -m device.conformance``; the checks: docs/conformance.md)
    vfio_user/    the vfio-user stack: protocol/ (sans-IO codec: constants, messages,
                  framing), transport (unix socket, SCM_RIGHTS), session (one client's
                  state and the one dispatcher), server (endpoints and their threads),
                  dma (the DMA map table), irq (eventfds), client (our own client)
    trace         structured tracing, off by default (a module boolean); JSON lines
                  and Perfetto trace files
    errors, units the error tree (drawn in errors.py) and shared sizes

Which file to open:
    add a ring command                  gpu/engine/commands.py (one decorated function), then
                                        ``python -m device.docs``
    add or change a register            gpu/regs/table.py (the table); its behaviour is
                                        the handler of its ``on_write`` action
    change a denied-access policy       gpu/aperture/access_policy.py
    change how an aperture page maps    gpu/memory/page_table.py (the table) and
                                        Aperture.fault in gpu/aperture/window.py
    support a new vfio-user message     vfio_user/protocol/messages.py (its layout) and
                                        vfio_user/session.py (its handler), then a check in
                                        conformance/checks_*.py and ``python -m device.docs``
    a new PCI capability                pci/capabilities.py, then gpu/instance/identity.py
    create instances differently        control/manager.py
    decode a new register or value      gpu/regs/table.py and abi.py (names come from them);
                                        a meaning of a value in insight/meanings.py
    add a control command or event      control/commands.py (one decorated function), then
                                        ``python -m device.docs``
    add an injectable fault             gpu/inject.py (FAULTS and a hook where it bites)
    give an instance a display          an attribute ``display`` on GpuInstance that is a
                                        display/source.py FrameSource; nothing else
    add a pixel format                  display/frame.py (PixelFormat, frame_to_rgb)
"""
