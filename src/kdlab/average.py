"""`python -m kdlab.average RUN_DIR [--out PATH] [--no_eval]`: see `kdlab.cli.average`."""

from __future__ import annotations

if __name__ == "__main__":
    from kdlab.cli.average import entrypoint

    entrypoint()
