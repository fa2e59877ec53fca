"""Acting on running guests: per-VM merge control through QEMU's memory backends.

qmp.py talks to a guest's QEMU through libvirt (QMP passthrough), control.py decides and
applies each guest's wanted `merge` setting behind the unmerge guard, audit.py checks that
denied guests share no pages, runtime.py remembers what ksmctl changed across restarts.
"""
