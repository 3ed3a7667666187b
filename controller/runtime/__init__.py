"""The loop that owns state and time: the daemon, its control cycle and its devices.

The runtime reads the clock, polls drivers, asks the pure core what to do, has the
executor do it, and hands each adapter the narrow view it needs. It is the only room that
holds mutable farm state.
"""
