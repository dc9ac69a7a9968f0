#!/usr/bin/env bash
# Reproduce the pipeline as a DVC experiment and write a Markdown report of what it changed against BASE.
#
#   ci/exp_report.sh [BASE] [REPORT] [-- extra `dvc exp run` arguments, e.g. -S cnn.epochs=5]
#
# BASE defaults to main, REPORT to exp_report.md. The plots of both sides (`dvc plots diff`) are rendered
# to PNG offline beside the report, in REPORT's name with _plots (exp_report_plots/); with PLOTS_URL set
# (where CI uploads them), the report links there. The one script that .github/workflows/experiment.yml
# runs, so a pull request gets the same report a person gets locally; tests/test_dvc_scaling.py runs it.
set -euo pipefail
base="${1:-main}"
report="${2:-exp_report.md}"
shift $(($# < 2 ? $# : 2))
if [ "${1:-}" = "--" ]; then shift; fi

dvc exp run "$@"

weights_of() {  # the ResNet50's weights_source from a metrics.json on stdin
    python -c 'import json, sys
try:
    print(json.load(sys.stdin)["resnet"]["weights_source"])
except (ValueError, KeyError):
    print("unknown")'
}

section() {  # a heading, then the command's Markdown table, or a line saying nothing changed
    local table
    table="$("${@:2}")"
    printf '### %s\n\n%s\n\n' "$1" "${table:-No change.}"
}

tmp="$(mktemp "$report.XXXXXX")"  # written beside the report, then renamed: never half a report
plots_dir="${report%.*}_plots"
trap 'rm -f "$tmp" "$tmp.plots.json"' EXIT
{
    printf '## kneexray: this experiment against `%s`\n\n' "$base"
    section "Metrics" dvc metrics diff "$base" --md
    section "Params" dvc params diff "$base" --md
    # Where CI can download ImageNet weights and the committed run could not (or the reverse), the
    # ResNet50's figures change with the environment, not the code: say which weights each side had.
    printf '### ResNet50 weights\n\n'
    printf -- '- %s: %s\n' "$base" "$(git show "$base:reports/metrics.json" 2>/dev/null | weights_of)"
    printf -- '- this experiment: %s\n' "$(weights_of <reports/metrics.json)"
    # The plots of both sides as PNG, rendered offline: a comment shows pictures, not vega views.
    rm -rf "$plots_dir"
    dvc plots diff "$base" --json >"$tmp.plots.json"
    python -m kneexray.report.pngs "$tmp.plots.json" --out "$plots_dir" >/dev/null
    printf '\n### Plots\n\n%s PNG files, this experiment against `%s`, in `%s`%s.\n' \
        "$(find "$plots_dir" -name '*.png' | wc -l)" "$base" "$plots_dir" "${PLOTS_URL:+: [download them]($PLOTS_URL)}"
} >"$tmp"
mv "$tmp" "$report"
echo "wrote $report"
