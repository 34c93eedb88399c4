#!/usr/bin/env bash
# Distil a student with train_advanced.py on a GPU box. Options map onto train_advanced.py's flags;
# everything after `--` is passed through unchanged. Exits with the training's own status.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: ./run_distillation_training.sh [options] [-- train_advanced.py options]

  --teacher_checkpoint PATH  teacher checkpoint (turns distillation on)
  --config NAME|PATH         config to train (default: people_b0_from_b3)
  --epochs N                 training.epochs
  --temperature T            distillation temperature (> 0)
  --alpha A                  distillation weight alpha (in [0, 1])
  --batch_size N             training.batch_size
  --resume PATH|auto         continue from a checkpoint (<run>/checkpoints/last.pth) or 'auto'
  -h, --help                 show this help

Python: $KDLAB_PYTHON if set, else `uv run python` when uv is installed, else python3.
Example:
  ./run_distillation_training.sh --teacher_checkpoint experiments/people_b3_teacher/checkpoints/best_model.pth \
      --epochs 50 --temperature 5 --alpha 0.6 -- --set training.lr=2e-4
USAGE
}

die() {
    echo "error: $*" >&2
    exit 2
}

config="people_b0_from_b3"
args=()
while [[ $# -gt 0 ]]; do
    option="$1"
    case "$option" in
        -h | --help)
            usage
            exit 0
            ;;
        --)
            shift
            args+=("$@")
            break
            ;;
        --teacher_checkpoint | --config | --epochs | --temperature | --alpha | --batch_size | --resume)
            [[ $# -ge 2 && "$2" != --* ]] || die "$option needs a value (see --help)"
            value="$2"
            shift 2
            case "$option" in
                --config) config="$value" ;;
                --temperature) args+=(--distillation_temperature "$value") ;;
                --alpha) args+=(--distillation_alpha "$value") ;;
                *) args+=("$option" "$value") ;;
            esac
            ;;
        *)
            die "unknown option '$option' (see --help; pass train_advanced.py options after --)"
            ;;
    esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${KDLAB_PYTHON:-}" ]]; then
    python_cmd=("$KDLAB_PYTHON")
elif command -v uv >/dev/null 2>&1; then
    python_cmd=(uv run --project "$here" python)
else
    python_cmd=(python3)
fi

exec "${python_cmd[@]}" "$here/train_advanced.py" --config "$config" "${args[@]}"
