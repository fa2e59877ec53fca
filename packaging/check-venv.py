"""Check the package's virtualenv as it will be installed (run by debian/rules after
dh_strip, and by tests/test_deb.py on the built package): everything the daemon, the
estimator and basic auth import loads from the venv's files, except what the package
takes from Debian (python3-yaml, python3-libvirt) through the venv's system site packages.

The venv's bin/python is a relative link that resolves only once installed, so this
runs the system python3 (the venv's interpreter) with the venv's site-packages first on
sys.path, which is the order the installed venv gives.
"""
import glob
import os
import subprocess
import sys

venv = os.path.abspath(sys.argv[1])
site = glob.glob(os.path.join(venv, "lib", "python%d.%d" % sys.version_info[:2], "site-packages"))
assert site, "no site-packages for python%d.%d under %s" % (sys.version_info[:2] + (venv,))
code = r"""
import sys
sys.path.insert(0, %r)
import ksmctl, ksmctl.cli, ksmctl.service, ksmctl.estimate, bcrypt, numpy, xxhash, pydantic, yaml
numpy.zeros(8).sum(); xxhash.xxh3_128(b"x").digest(); bcrypt.gensalt(4)
ours = [m for m in (ksmctl, pydantic, numpy, xxhash, bcrypt) if not m.__file__.startswith(%r)]
assert not ours, "not from the venv: %%s" %% [(m.__name__, m.__file__) for m in ours]
assert yaml.__file__.startswith("/usr/lib/python3/dist-packages/"), yaml.__file__
print("venv ok:", ksmctl.__file__, "; yaml from Debian:", yaml.__file__)
""" % (site[0], venv)
# cwd=/ so that the source tree being packaged is not on sys.path.
subprocess.run([sys.executable, "-s", "-c", code], check=True, cwd="/")
