# Sourced by the GPU benchmark scripts: the GPU machine has torch but not this project's other
# dependencies; carried wheels (.whl/) are installed into /tmp/site and put on PYTHONPATH.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
