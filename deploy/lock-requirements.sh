#!/bin/sh
# Writes the hash-pinned locks that deploy/Dockerfile installs with `pip install --require-hashes`:
# the project's dependencies (pyproject.toml), Ray with the extras the cluster runs (the dashboard
# that KubeRay's probes and job submission talk to, Train, Tune) and setuptools (the project is
# built without build isolation), resolved for the image's Python 3.11 on Linux x86_64.
#
#   deploy/lock-requirements.sh          # both locks
#   deploy/lock-requirements.sh gpu      # deploy/requirements-gpu.txt: everything from PyPI
#   deploy/lock-requirements.sh cpu      # deploy/requirements-cpu.txt: torch and torchvision
#                                        # "+cpu" from download.pytorch.org, the rest from PyPI
#
# Needs uv (`pip install uv`) and the network. Run it after changing a dependency or Ray's version,
# and commit what it writes; tests/deploy/test_image.py checks the locks against pyproject.toml
# and the RayJobs' rayVersion.
set -eu
cd "$(dirname "$0")/.."
ray_version=2.60.0 # = rayVersion in deploy/base/rayjob-*.yaml

input=$(mktemp)
trap 'rm -f "$input"' EXIT
python3 -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$input"
printf '%s\n' "ray[default,train,tune]==$ray_version" "setuptools>=68" >>"$input"

compile() { # compile VARIANT [uv options]
    variant=$1
    shift
    uv pip compile "$input" --quiet --no-config --generate-hashes --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
        --custom-compile-command "deploy/lock-requirements.sh $variant" \
        --output-file "deploy/requirements-$variant.txt" "$@"
}

for variant in ${1:-gpu cpu}; do
    case $variant in
    gpu) compile gpu ;;
    cpu) compile cpu --extra-index-url https://download.pytorch.org/whl/cpu --emit-index-url ;;
    *) echo "usage: $0 [gpu|cpu]" >&2 && exit 2 ;;
    esac
done
