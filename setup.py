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
        # prometheus_client: the node's /metrics, one registry per node, served
        # by its twisted MetricsResource.
        "prometheus_client>=0.17",
        # pyOpenSSL and service_identity: TLS on every connection.
        "pyOpenSSL>=22.1",
        "service_identity>=21.1",
        # treq: HTTP client for etcd's v3 JSON gateway (the etcd coordinator).
        "treq",
        # tqdm: the download progress bar of `p2pfiles get` (rate, ETA,
        # terminal width), the library magic-wormhole uses for the same job.
        "tqdm>=4.60",
    ],
    # The status page's HTML, CSS and JavaScript, served by p2pfiles.web.
    package_data={"p2pfiles": ["static/*.html", "static/*.css", "static/*.js"]},
    extras_require={
        # hypothesis: property tests of the wire codec and name checks.
        "test": ["hypothesis"],
        # towncrier: builds NEWS from newsfragments/.
        "dev": ["hypothesis", "towncrier"],
    },
    entry_points={"console_scripts": ["p2pfiles = p2pfiles.cli:main"]},
)
