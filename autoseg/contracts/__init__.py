"""The files stages hand each other: one owner per contract, below every stage package.

``plans.py`` (plans.json), ``fingerprint.py`` (fingerprint.json), ``splits.py`` (splits.json),
``checkpoint.py`` (checkpoint_*.pt and its metadata), ``postprocessing.py`` (postprocessing.json and its
application). A stage that writes one of these files and a stage that reads it both import the contract from
here, so neither imports the other (docs/internals.md, "Which way imports run"). Modules here import only the
base modules (errors, fileio, paths) and libraries, never a stage package; tests/test_import_direction.py
checks it.

Nothing is imported here: ``autoseg.contracts.checkpoint`` needs torch, and a stage that reads plans.json
should not pay for it.
"""
