"""mgpu: a mediated GPU emulator for QEMU, served over vfio-user in pure Python.

The layers, bottom up.  Imports only go down: a module imports from its own layer or
the ones below it, never above.

    harness/      guest harness: boot QEMU with instances attached (vm, launch =
                  run_qemu.sh), the pytest plugin driver projects use
                  (pytest_plugin) and a reference Python driver (driver) for tests
    control/      control plane: GpuServer (create and destroy instances at run time,
                  events, manager), the command table (commands: the single source
                  of truth of the control socket), the QMP control socket (qmp), the
                  command line (cli) and its mdevctl-style client commands (ctl)
    gpu/          the device model: one physical GPU (physical: the shared pool,
                  eviction and page-in; device_memory, allocator, types) shared by
                  instances; an instance (instance) composes its parts:
                    identity          PCI IDs, BARs, capabilities, FLR
                    regions           the vfio-user regions and IRQ indexes
                    registers         the BAR0 register table (single source of truth)
                    register_file     register values; writes dispatched to actions
                    interrupts        INT_STATUS/INT_MASK and the vectors they raise
                    rings             one command ring per context
                    commands          ring commands: layout, doc and handler in one
                    engine            runs ring commands on a thread, fenceable
                    bringup_dma       the DMA_* registers' copy engine
                    resources         resources: pages, residency, pins, lifetime
                    resource_commands the RES_* registers: CREATE, DESTROY, the GPU MMU
                    aperture_map      the GPU MMU page table: aperture page -> resource page
                    access_policy     what a denied aperture access gets
                    aperture          the BAR2 window: validate_map_request at fault
                                      time, parked faults, fences, coherency
                    fault_log         what happened to aperture pages, as records
                    modes             InterruptMode, MappingMode, DeniedPolicy
                    inject            fault injection: the fault table and its state
                    instance_api      observation, the Python API, injection (mixin)
                    instance_hosts    what the workers call back (mixin)
    fuse/         the fault engine: a one-file FUSE filesystem whose reads are page
                  faults (protocol: the kernel protocol; server: mount, serve, revoke)
    pci/          PCI building blocks: config space (config) and one builder per
                  capability (capabilities)
    vfio_user/    the vfio-user stack: protocol/ (sans-IO codec: constants, messages,
                  framing), transport (unix socket, SCM_RIGHTS), session (one client's
                  state and the one dispatcher), server (endpoints and their threads),
                  dma (the DMA map table), irq (eventfds), client (our own client)
    trace         structured tracing, off by default (a module boolean); JSON lines
                  and Perfetto trace files
    errors, units the error tree (drawn in errors.py) and shared sizes

Which file to open:
    add a ring command                  gpu/commands.py (one decorated function), then
                                        ``python -m device.docs``
    add or change a register            gpu/registers.py (the table); its behaviour is
                                        the handler of its ``on_write`` action
    change a denied-access policy       gpu/access_policy.py
    change how an aperture page maps    gpu/aperture_map.py (the table) and
                                        Aperture.fault in gpu/aperture.py (validation)
    support a new vfio-user message     vfio_user/protocol/messages.py (its layout) and
                                        vfio_user/session.py (its handler)
    a new PCI capability                pci/capabilities.py, then gpu/identity.py
    create instances differently        control/manager.py
    add a control command or event      control/commands.py (one decorated function), then
                                        ``python -m device.docs``
    add an injectable fault             gpu/inject.py (FAULTS and a hook where it bites)
"""
