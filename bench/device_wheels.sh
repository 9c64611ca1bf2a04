#!/usr/bin/env bash
# Wheels a machine with only torch + torchvision (CPython 3.12, x86-64 Linux) needs to import the
# project's non-Ray modules (cluster.storage needs boto3, training.data needs webdataset),
# downloaded into .whl/ at the repo root, pinned to the versions installed in .venv.
#
#     bench/device_wheels.sh
#
# numpy and pillow are not here: torchvision brings them. On the device:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#         && export PYTHONPATH=/tmp/site
set -euo pipefail

cd "$(dirname "$0")/.."
PACKAGES=(
    boto3 botocore s3transfer jmespath urllib3 python-dateutil six
    webdataset braceexpand pyyaml prometheus-client
)

pins=()
for name in "${PACKAGES[@]}"; do
    version=$(.venv/bin/pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [[ -z "$version" ]]; then
        echo "error: $name is not installed in .venv" >&2
        exit 1
    fi
    pins+=("$name==$version")
done

rm -rf .whl
# One package at a time: with --no-deps pip still refuses a set that conflicts, and a failure
# then names the package.
for pin in "${pins[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$pin"
done

# Anything required (not an extra) beyond these and torch, torchvision, numpy, pillow?
known=" ${PACKAGES[*]} torch torchvision numpy pillow "
missing=0
for wheel in .whl/*.whl; do
    while read -r requirement; do
        dep=$(sed -E 's/^([A-Za-z0-9._-]+).*/\1/' <<<"$requirement" | tr 'A-Z_.' 'a-z--')
        if [[ "$known" != *" $dep "* ]]; then
            echo "warning: $(basename "$wheel") requires $requirement, not downloaded" >&2
            missing=1
        fi
    done < <(unzip -p "$wheel" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' \
        | grep -v 'extra *==' || true)
done

ls -1 .whl
echo
echo "on the device:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl" \
    "&& export PYTHONPATH=/tmp/site"
exit "$missing"
