"""Reports: figures, the HTML report, the offline template for `dvc plots` and its PNG renderer."""
