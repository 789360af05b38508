from setuptools import find_packages, setup

setup(
    name="p2pfiles",
    version="0.1.0.dev0",
    description="A small-cluster file-sharing service built on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests*", "bench*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted>=23.10",
        "zope.interface",
        # treq: HTTP client for etcd's v3 JSON gateway (the etcd coordinator).
        "treq",
    ],
    extras_require={
        # hypothesis: property tests of the wire codec and name checks.
        "test": ["hypothesis"],
        # towncrier: builds NEWS from newsfragments/.
        "dev": ["hypothesis", "towncrier"],
    },
    entry_points={"console_scripts": ["p2pfiles = p2pfiles.cli:main"]},
)
