"""Training loops, one flat function per stage, built on `ldmkit.train.common`."""
