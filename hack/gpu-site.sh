#!/usr/bin/env bash
# Prepare .gpu/site: the Python packages a GPU machine's image lacks for the trainer's GPU tests and benchmarks
# (bitsandbytes, liger-kernel, pydantic, boto3, peft at our pin), unpacked for Python 3.12 on x86-64 and trimmed
# (bitsandbytes' CUDA 13 libraries only, botocore's S3/STS data only) to travel with the working tree. Needs PyPI here.
#   bash hack/gpu-site.sh && <on the GPU machine> bash hack/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]/#/--platform=}" -d .gpu/wheels \
  bitsandbytes==0.50.2 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types \
  typing-inspection boto3==1.44.5 botocore==1.44.5 s3transfer jmespath python-dotenv peft==0.21.2 \
  liger-kernel==0.8.5
for wheel in .gpu/wheels/*.whl; do (cd .gpu/site && unzip -q -o "../../$wheel"); done
rm -rf .gpu/wheels
rm -f .gpu/site/bitsandbytes/libbitsandbytes_{cuda11,cuda12,rocm,xpu}*.so
find .gpu/site/botocore/data -mindepth 1 -maxdepth 1 \
  ! -name s3 ! -name sts ! -name endpoints.json ! -name partitions.json ! -name sdk-default-configuration.json \
  ! -name _retry.json -exec rm -rf {} +
du -sh .gpu/site
