"""Only the package list, which pyproject.toml cannot express: every bigjax package found on disk,
plus the top-level configs/ folder installed as bigjax.configs (see [tool.setuptools] there)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=['bigjax', 'bigjax.*']) + ['bigjax.configs'])
