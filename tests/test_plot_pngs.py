"""DVC's plot JSON rendered to PNG offline (for pull-request comments and CI artifacts)."""

from __future__ import annotations

import json

from kneexray.report.pngs import main, render

SPEC = {
    "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
    "data": {"values": [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]},
    "mark": "line",
    "encoding": {"x": {"field": "step", "type": "quantitative"}, "y": {"field": "loss", "type": "quantitative"}},
}


def test_vega_plots_become_pngs_and_images_are_skipped(tmp_path):
    plots = {
        "data": {
            "Training loss": [{"type": "vega", "content": SPEC}],
            "reports/figures/x.png": [{"type": "image", "url": "x.png"}],
        }
    }
    written = render(plots, tmp_path / "out")
    assert [p.name for p in written] == ["training_loss.png"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_dvc_plot_json_is_one_line(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"something": 1}))
    assert main([str(tmp_path / "p.json"), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: not the JSON of `dvc plots")
