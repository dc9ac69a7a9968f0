"""Any class set from params: the whole pipeline on a 5-class phantom. The 2-class case runs in
tests/test_sources.py (two sources of a 2-class set), with the same checks (tests/support.check_class_set)."""

from __future__ import annotations

import pytest
import yaml

from tests.support import check_class_set, run

pytestmark = pytest.mark.slow


def test_pipeline_runs_on_a_five_class_set(project):
    classes = ["kl0", "kl1", "kl2", "kl3", "kl4"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dataset"]["classes"] = classes
    params["phantom"].update(n_images=24 * len(classes), class_fractions=dict.fromkeys(classes, 1 / len(classes)))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project)
    check_class_set(project, classes, 24 * len(classes))
