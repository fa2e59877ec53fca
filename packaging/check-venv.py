"""Build-time check of the package's virtualenv (run by debian/rules): everything the
daemon and CLI import loads, from the venv, except what the package takes from Debian
(python3-yaml, python3-libvirt) through the venv's system site packages."""
import os
import subprocess
import sys

venv = os.path.abspath(sys.argv[1])
code = r"""
import ksmctl, ksmctl.cli, ksmctl.service, ksmctl.estimate, bcrypt, numpy, xxhash, pydantic, yaml
ours = [m for m in (ksmctl, pydantic, numpy, xxhash, bcrypt) if not m.__file__.startswith(%r)]
assert not ours, "not from the venv: %%s" %% [(m.__name__, m.__file__) for m in ours]
assert yaml.__file__.startswith("/usr/lib/python3/dist-packages/"), yaml.__file__
print("venv ok:", ksmctl.__file__, "; yaml from Debian:", yaml.__file__)
""" % venv
# cwd=/ so that the source tree being packaged is not on sys.path.
subprocess.run([venv + "/bin/python", "-c", code], check=True, cwd="/")
