"""Where readings come from: sysfs (KSM), /proc (memory, pressure, ksmd, processes)
and libvirt. Each collector takes its filesystem root as a constructor argument."""
