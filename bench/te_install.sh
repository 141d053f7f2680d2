#!/bin/bash
# transformer-engine 2.20.2 (CUDA 13, Python 3.12) on a GPU machine that cannot download it,
# from the files that ../shared/wheels/get-transformer-engine.sh prepares under .te/: its core
# wheel in pieces of under 60 MB (.te/pieces/te.whl.partNN, SHA256), and the small wheels
# beside it with the prebuilt transformer_engine_torch extension (.te/small/). A device call
# carries at most 64 MiB, so the pieces travel one per call and wait in /tmp until the last:
#
#   bench/te_install.sh stash .te/pieces/te.whl.part00      (one call per piece, back to back)
#   bench/te_install.sh install /tmp/te                       (with .te/small and the SHA256)
#
# The last call must carry .te/pieces/SHA256 and .te/small beside the last piece, and should stop
# when the install fails (`... install /tmp/te && python3 bench/gpu_speed.py ...`).
#
# TARGET is a site directory of its own: put it on PYTHONPATH for the transformer-engine path
# only (MOE_TE_SITE=TARGET for bench/gpu_speed.py and bench/te_check.py).
set -euo pipefail
stash=/tmp/te-pieces
case "${1:-}" in
  stash)
    mkdir -p "$stash"
    cp "$2" "$stash/"
    ls -la "$stash" ;;
  install)
    target=${2:?target directory}
    wheel="$stash/$(awk '{print $2}' .te/pieces/SHA256)"
    cat "$stash"/te.whl.part* > "$wheel"
    (cd "$stash" && sha256sum -c "$OLDPWD/.te/pieces/SHA256")
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$wheel" .te/small/*.whl
    rm -f "$wheel"
    PYTHONPATH="$target:${PYTHONPATH:-}" python3 -c "import transformer_engine.pytorch as te, torch; \
print('transformer-engine', te.__version__ if hasattr(te, '__version__') else '?', 'on', torch.cuda.get_device_name())" ;;
  *)
    echo "usage: $0 stash PIECE | install TARGET" >&2; exit 2 ;;
esac
