"""Where codsplat's packages live. pyproject.toml holds everything else; this file exists because the
four top folders install as `codsplat.*` (a prefix setuptools' finder cannot add), and every folder
below them is found here rather than listed by hand, so a new subpackage cannot be left out of a
wheel (`orchestrator/executors` once was, and only installs from a wheel noticed)."""

from setuptools import find_packages, setup

ROOTS = {"codsplat.pipeline": "pipeline", "codsplat.orchestrator": "orchestrator",
         "codsplat.jobspecs": "jobspecs", "codsplat.aws": "aws"}

setup(package_dir=ROOTS,
      packages=[f"{name}.{sub}" if sub else name for name, folder in ROOTS.items() for sub in ["", *find_packages(folder)]])
