"""`ksmctl doctor`: why each guest merges or does not, and the kernel settings behind it.

findings.py is the vocabulary (severity, a bounded set of reasons, evidence), host.py and
vm.py the rules, each a function from readings to findings; report.py renders them as
text or stable JSON and decides the exit code. Nothing here reads files itself: the
collectors do (collectors/memlayout.py, collectors/vms/backends.py, kernel/sysfs.py).
"""
