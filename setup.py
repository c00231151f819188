"""Which packages install, found from the tree (the rest of the metadata is in pyproject.toml).

modules/ and storage/ live at the top level of the repository but install
only under the xmppd import name (xmppd.modules, xmppd.storage). pyproject's
static `packages` list would have to name every subpackage by hand, and a new
one (modules/muc/, say) would be silently left out of a normal install;
find_packages below each root sees it.
"""

from setuptools import find_packages, setup

ROOTS = {"xmppd": "xmppd", "xmppd.modules": "modules", "xmppd.storage": "storage"}

setup(
    package_dir=ROOTS,
    packages=[
        f"{name}.{sub}" if sub else name
        for name, path in ROOTS.items()
        for sub in ["", *find_packages(path)]
    ],
)
