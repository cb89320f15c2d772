"""Driver insight: what the device saw, in the driver's words.

It sits above the device model (it reads its tables: registers, ring commands, the
ABI's enums) and below the control plane, which serves it.

    names      names from the device's tables: BAR0 offsets (an unmodeled one by the
               block it falls in), config space fields, flags and enum values
    decode     trace records decoded symbolically (``mgpu trace show --decode``,
               ``mgpu trace decode FILE``): it reads records, it never emits them
    perfetto   the decoded records as a Perfetto timeline: a track per instance,
               register, ring and engine; flows from each submit to its fence

Device-side coverage and record/replay are designed in docs/insight.md.
"""
