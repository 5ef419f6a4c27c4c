"""Offline stand-in for the pip bootstrap script that ansible-test downloads.

ansible-test creates its sanity-test virtual environments without pip and then runs a `get-pip` script
that it fetches from a host this machine cannot reach (only PyPI is reachable). This stand-in does the
same job with the interpreter's own ensurepip, then lets pip install the pinned versions ansible-test
asks for (from PyPI). `make sanity` copies it to ~/.ansible/test/cache/get_pip_<version>.py when absent.
"""

import subprocess
import sys


def main():
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"], stdout=subprocess.DEVNULL)
    # --no-setuptools/--no-wheel are get-pip's own options (do not install those); pip does not know them.
    args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
    return subprocess.call([sys.executable, "-m", "pip", "install"] + args)


if __name__ == "__main__":
    sys.exit(main())
