"""Curation (issue 4): labelled medical images from many sources -> one traceable record format.
Entry points: `medvl curate` (cli.py) and :func:`medvl.curate.pipeline.curate`. See docs/curate.md."""
