"""`python -m kdlab.predict ...` is an alias of the `kdlab-predict` command (kdlab.cli.predict): the entry
point is run by name so this layer does not import the CLI layer above it."""

import runpy

runpy.run_module("kdlab.cli.predict", run_name="__main__")
