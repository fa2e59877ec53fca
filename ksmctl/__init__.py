"""ksmctl: a KSM (Kernel Samepage Merging) controller, exporter and CLI for KVM hosts."""

__version__ = "0.1.0"
