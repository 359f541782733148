"""The report builder: a study's tracked runs -> tables, figures, a written reading and a notebook (the CLI is
``reports/build.py``; the modules read straight down: formatting, paper, rows, loading, tables, header,
reading, figures, notebook, build)."""
import os

# MLflow reads this when it is imported: set before any report module imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
