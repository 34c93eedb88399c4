"""What differs between the runs of one report in how their numbers were made (summary.json `provenance`)."""

from __future__ import annotations

from kdlab.experiments.report.run_files import RunRecord, nested, read_run

# What makes numbers of one table incomparable when it differs between runs (summary.json `provenance`).
PROVENANCE_KEYS = ("torch", "device_name", "threads", "amp")


def provenance_note(records: list[RunRecord]) -> str | None:
    """A sentence naming what differs between the runs' provenance (torch version, hardware, threads, AMP), or
    None when every run with a recorded provenance agrees. Runs written before provenance was recorded are
    left out of the comparison."""
    seen: dict[str, dict[str, list[str]]] = {key: {} for key in PROVENANCE_KEYS}
    for record in records:
        prov = nested(read_run(record.run_dir).summary, "provenance")
        if not isinstance(prov, dict):
            continue
        for key in PROVENANCE_KEYS:
            seen[key].setdefault(str(prov.get(key)), []).append(record.name)
    parts = []
    for key, values in seen.items():
        if len(values) > 1:
            listed = "; ".join(f"{value}: {', '.join(names)}" for value, names in values.items())
            parts.append(f"{key} ({listed})")
    if not parts:
        return None
    return (
        "Provenance differs between these runs, so their numbers are not strictly comparable: "
        + ", ".join(parts)
        + "."
    )
